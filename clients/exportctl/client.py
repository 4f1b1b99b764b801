"""An asyncio QMP client for exportd (and any QMP server).

    async with Client() as c:
        await c.connect("/run/exportd.sock")      # greeting + qmp_capabilities
        # (connect(path, negotiate=False) then await c.negotiate() to do it apart)
        info = await c.execute("query-version")
        try:
            await c.execute("blockdev-del", {"node-name": "x"})
        except QMPError as e:
            print(e.cls, e.desc)
        async for event in c.events():            # {"event", "data", "timestamp"}
            ...
        ev = await c.next_event(timeout=1.0)       # or one at a time: None if none came

Server messages are lines ending in CRLF. Replies are matched to requests
by id, so several commands may be in flight at once; events go to a queue
that events() drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

LINE_LIMIT = 256 << 20  # a query-qmp-schema reply is large; a line is one message


class QMPError(Exception):
    """The server answered with an error."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class ConnectError(Exception):
    """The server could not be reached, or broke the protocol."""


class Client:
    def __init__(self) -> None:
        self.greeting: dict[str, Any] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self, path: str, *, negotiate: bool = True, timeout: float | None = 10.0) -> dict[str, Any]:
        """Connect, read the greeting, and (by default) leave negotiation mode."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=LINE_LIMIT), timeout
            )
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except (OSError, TimeoutError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "timed out"
            raise ConnectError(f"cannot connect to {path}: {reason}") from e
        try:
            greeting = json.loads(line)
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise ValueError("no QMP greeting")
        except ValueError as e:
            raise ConnectError(f"{path} does not speak QMP ({e})") from e
        self.greeting = greeting
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        if negotiate:
            await self.negotiate()
        return greeting

    async def negotiate(self, enable: list[str] | None = None) -> None:
        """Leave capabilities negotiation mode (events flow from then on)."""
        await self.execute("qmp_capabilities", {"enable": enable} if enable else None)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    raise ConnectError("the server closed the connection")
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    continue
                if "event" in msg:
                    self._events.put_nowait(msg)
                    continue
                fut = self._pending.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            self._error = e if isinstance(e, ConnectError) else ConnectError(f"connection lost: {e}")
        finally:
            err = self._error or ConnectError("connection closed")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self._events.put_nowait(None)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; its "return" value, or QMPError."""
        if self._writer is None:
            raise ConnectError("not connected")
        if self._error is not None:
            raise self._error
        msg_id = f"exportctl-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self._writer.write(json.dumps(msg).encode() + b"\r\n")
        try:
            await self._writer.drain()
        except OSError as e:
            self._pending.pop(msg_id, None)
            raise ConnectError(f"connection lost: {e}") from e
        reply = await fut
        if "error" in reply:
            err = reply["error"]
            raise QMPError(err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events as they arrive, until the connection ends."""
        while True:
            ev = await self._events.get()
            if ev is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield ev

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds without one;
        ConnectError once the connection has ended."""
        try:
            ev = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None
        if ev is None:
            self._events.put_nowait(None)
            raise self._error or ConnectError("connection closed")
        return ev

    def has_events(self) -> bool:
        return not self._events.empty()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._writer = None
