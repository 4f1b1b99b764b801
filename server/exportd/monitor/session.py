"""One QMP client connection: greeting, negotiation, dispatch, replies, events.

Commands from one client run one after the other, in order. The reader is
paced by the replies (each reply is drained before the next message is
taken), so a client that sends without reading only stalls itself. A client
that disconnects while its command runs does not cancel it: the command
completes and its reply is dropped, so no half-done state is left behind.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from exportd.errors import CommandNotFound, QMPError
from exportd.monitor.jsonstream import JsonStream, ParseError

if TYPE_CHECKING:
    import asyncio

    from exportd.monitor.executor import CommandExecutor

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# A client whose unread output passes this is not reading: drop it rather
# than let events pile up in memory.
MAX_PENDING_OUTPUT = 16 << 20


def encode(message: dict[str, Any], pretty: bool = False) -> bytes:
    """One server message: JSON ending in CRLF (one line unless pretty)."""
    text = json.dumps(message, indent=4 if pretty else None)
    return (text + "\r\n").encode()


def event_message(name: str, data: dict[str, Any] | None) -> dict[str, Any]:
    now = time.time()
    seconds = int(now)
    msg: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return msg


class Session:
    def __init__(
        self,
        executor: CommandExecutor,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        pretty: bool = False,
    ) -> None:
        self.executor = executor
        self.reader = reader
        self.writer = writer
        self.pretty = pretty
        self.negotiated = False
        self.closed = False

    # --- output -----------------------------------------------------------------
    def _write(self, message: dict[str, Any]) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        try:
            data = encode(message, self.pretty)
        except (ValueError, TypeError, RecursionError) as e:
            log.warning("reply could not be encoded: %s", e)
            data = encode(
                {"error": {"class": "GenericError", "desc": f"Reply could not be encoded: {e}"}},
                self.pretty,
            )
        self.writer.write(data)
        return True

    async def send(self, message: dict[str, Any]) -> None:
        if self._write(message):
            try:
                await self.writer.drain()
            except ConnectionError:
                self.close()

    def send_event(self, message: dict[str, Any]) -> None:
        """Queue an event (no waiting: events come from anywhere on the loop)."""
        if not self.negotiated or self.closed:
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("QMP client is not reading its events; disconnecting it")
            self.close()
            return
        self._write(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    # --- input ------------------------------------------------------------------
    async def run(self) -> None:
        greeting = self.executor.greeting()
        await self.send(greeting)
        stream = JsonStream()
        try:
            while not self.closed:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for item in stream.feed(data):
                    await self.handle(item)
                    if self.closed:
                        break
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug here ends this client only
            log.exception("QMP session failed")
        finally:
            self.close()

    async def handle(self, item: Any) -> None:
        if isinstance(item, ParseError):
            await self.send(_error_reply(QMPError(item.desc)))
            return
        reply = await self.dispatch(item)
        await self.send(reply)

    async def dispatch(self, request: Any) -> dict[str, Any]:
        """Check one request's framing, run it, and build the reply."""
        if not isinstance(request, dict):
            return _error_reply(QMPError("QMP input must be a JSON object"))
        has_id = "id" in request
        try:
            name, args = _check_request(request)
            if not self.negotiated and name != "qmp_capabilities":
                raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
            if self.negotiated and name == "qmp_capabilities":
                self.executor.check_arguments(name, args)  # QEMU checks arguments first
                raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
            result = await self.executor.execute(name, args)
            if name == "qmp_capabilities":
                self.negotiated = True
        except QMPError as e:
            return _error_reply(e, request.get("id"), has_id)
        except Exception as e:  # a bug must not take the daemon down
            log.exception("command %r failed", request.get("execute"))
            return _error_reply(QMPError(f"Internal error: {e}"), request.get("id"), has_id)
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if has_id:
            reply["id"] = request["id"]
        return reply


def _check_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """QEMU's qmp_dispatch_check_obj(): the top-level members of a request."""
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QMPError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QMPError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


def _error_reply(e: QMPError, id_value: Any = None, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {}
    if has_id:
        reply["id"] = id_value
    reply["error"] = {"class": e.cls, "desc": e.desc}
    return reply
