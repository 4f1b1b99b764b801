"""One QMP client connection: greeting, negotiation, dispatch, replies, events.

Commands from one client run one after the other, in order. The reader is
paced by the replies (each reply is drained before the next message is
taken), so a client that sends without reading only stalls itself. A client
that disconnects while its command runs does not cancel it: the command
completes and its reply is dropped, so no half-done state is left behind.

No client holds the loop for long (aio/budget.py): its input is parsed a
few KiB at a time, and parsing, commands and the writing of a big reply
give the loop back once their time slice is used up.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from exportd.aio.budget import TimeSlice
from exportd.errors import CommandNotFound, QMPError
from exportd.monitor.fdpass import MonitorFds, NamedFds, current_monitor_fds
from exportd.monitor.jsonstream import BIG_STRING, JsonStream, ParseError

if TYPE_CHECKING:
    import asyncio

    from exportd.monitor.executor import CommandExecutor
    from exportd.monitor.fdpass import FdReceivingReader

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# parsed this much at a time: about a millisecond at worst (2-byte tokens)
FEED_SLICE = 1024
# A client whose unread output passes this is not reading: drop it rather
# than let events pile up in memory.
MAX_PENDING_OUTPUT = 16 << 20


def encode(message: dict[str, Any], pretty: bool = False) -> bytes:
    """One server message: JSON ending in CRLF (one line unless pretty)."""
    return b"".join(encode_pieces(message, pretty))


# stands for a big string in the skeleton of a message; a string of the
# message that equals it by chance would need this process's random part
_PLACEHOLDER = f"\0exportd-big-string-{uuid.uuid4().hex}-"


def encode_pieces(message: dict[str, Any], pretty: bool = False) -> Iterator[bytes]:
    """encode(), in pieces of about BIG_STRING bytes where the message holds
    big strings (an error that quotes a 28 MiB argument...): json.dumps of
    such a string takes the loop for a second. The message's skeleton is
    encoded with placeholders, each string then slice by slice (JSON escapes
    each character on its own, so the slices join into the same text).
    Messages are searched for big strings only once a client sent one."""
    big: list[str] = []
    skeleton = _without_big_strings(message, big) if JsonStream.big_strings_seen else message
    text = json.dumps(skeleton, indent=4 if pretty else None)
    if not big:
        yield (text + "\r\n").encode()
        return
    for i, value in enumerate(big):
        marker = json.dumps(f"{_PLACEHOLDER}{i}")
        before, text = text.split(marker, 1)
        yield (before + '"').encode()
        for start in range(0, len(value), BIG_STRING):
            yield json.dumps(value[start : start + BIG_STRING])[1:-1].encode()
        yield b'"'
    yield (text + "\r\n").encode()


def _without_big_strings(value: Any, big: list[str]) -> Any:
    """`value` with each string longer than BIG_STRING replaced by a
    placeholder (appended to `big`, in the order json.dumps meets them);
    the same object when it has none."""
    if isinstance(value, str):
        if len(value) <= BIG_STRING:
            return value
        big.append(value)
        return f"{_PLACEHOLDER}{len(big) - 1}"
    if isinstance(value, dict):
        out = {k: _without_big_strings(v, big) for k, v in value.items()}
        return out if any(out[k] is not v for k, v in value.items()) else value
    if isinstance(value, list):
        items = [_without_big_strings(v, big) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


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
        reader: FdReceivingReader,
        writer: asyncio.StreamWriter,
        *,
        pretty: bool = False,
    ) -> None:
        self.executor = executor
        self.reader = reader
        # descriptors sent with SCM_RIGHTS, for getfd (fdpass.py)
        self.fds: MonitorFds = reader.fds if reader is not None else MonitorFds(NamedFds())
        self.writer = writer
        self.pretty = pretty
        self.negotiated = False
        self.closed = False
        self.turn = TimeSlice()
        # events that came while a reply was being written in slices: they
        # go out after it, not in the middle of its text
        self._held_events: list[dict[str, Any]] | None = None

    # --- output -----------------------------------------------------------------
    def _pieces(self, message: dict[str, Any]) -> list[bytes] | Iterator[bytes]:
        try:
            pieces = encode_pieces(message, self.pretty)
            first = next(pieces)  # the skeleton: where encoding errors show
        except (ValueError, TypeError, RecursionError) as e:
            log.warning("reply could not be encoded: %s", e)
            return [encode({"error": {"class": "GenericError", "desc": f"Reply could not be encoded: {e}"}},
                           self.pretty)]
        return _chain(first, pieces)

    def _write(self, message: dict[str, Any]) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        for piece in self._pieces(message):
            self.writer.write(piece)
        return True

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed or self.writer.is_closing():
            return
        self._held_events = []
        try:
            for piece in self._pieces(message):
                self.writer.write(piece)
                await self.turn.pause_if_due()
        finally:
            held, self._held_events = self._held_events, None
            for event in held:
                self._write(event)
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
        if self._held_events is not None:
            self._held_events.append(message)
            return
        self._write(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()
            if self.reader is not None:  # None only in unit tests of the output side
                self.reader.close()

    # --- input ------------------------------------------------------------------
    async def run(self) -> None:
        greeting = self.executor.greeting()
        await self.send(greeting)
        stream = JsonStream()
        turn = self.turn
        try:
            while not self.closed:
                data = memoryview(await self.reader.read(READ_CHUNK))
                if not data:
                    break
                for start in range(0, len(data), FEED_SLICE):
                    for item in stream.feed(data[start : start + FEED_SLICE]):
                        await self.handle(item)
                        await turn.pause_if_due()
                        if self.closed:
                            return
                    await turn.pause_if_due()
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug here ends this client only
            log.exception("QMP session failed")
        finally:
            self.close()
            self.reader.release()
            self.fds.close()

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
            fds_token = current_monitor_fds.set(self.fds)
            try:
                result = await self.executor.execute(name, args)
            finally:
                current_monitor_fds.reset(fds_token)
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


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


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
