"""The NBD client's transmission phase: one connection after its handshake.

A `Connection` is the connection's asyncio.BufferedProtocol (client.py hands
it the transport once negotiation is done). Replies are parsed in the
receive callback itself, without a reader task or stream copies: headers
land in one preallocated receive buffer, a READ's data is copied from there
into the request's buffer or, for the part not yet received, received
straight into it (get_buffer returns the request's buffer). Each request is
one transport write (header and payload together: writelines), any number
are in flight, each matched to its reply by cookie; `request()` returns a
future without awaiting anything.

When the stream ends or the server breaks the protocol, every request in
flight and every later one raises `ConnectionLost`; what to do then (EIO,
or reconnect and retry) is the block driver's choice (block/nbd.py).
Errors the server reports for one request are OSError with the host errno.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from exportd.nbd import protocol as p

log = logging.getLogger("exportd.nbd.client")

RECV_SIZE = 256 << 10  # headers and small replies; large data goes straight to its request
COMPACT_BELOW = 32 << 10  # free space under which unparsed bytes move to the front
MAX_CHUNK = 64 << 20  # a non-data reply chunk longer than this is garbage
_U32 = p.U32.unpack_from
_SIMPLE = p.SIMPLE_REPLY.unpack_from
_STRUCTURED = p.STRUCTURED_REPLY.unpack_from
_U64 = p.U64.unpack_from
_PACK_REQUEST = p.REQUEST.pack
SIMPLE_SIZE = p.SIMPLE_REPLY.size
STRUCTURED_SIZE = p.STRUCTURED_REPLY.size


class ConnectionLost(Exception):
    """The connection ended (or is unusable); requests on it did not complete."""


@dataclass
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 << 20  # proto.md: without INFO BLOCK_SIZE, 32 MiB is safe
    structured: bool = False
    context_id: int | None = None  # base:allocation, when the server agreed


@dataclass(slots=True)
class _Pending:
    cmd: int
    offset: int
    length: int
    future: asyncio.Future[Any]
    buf: memoryview | None = None  # READ: where data chunks land (request-relative)
    extents: list[tuple[int, int]] = field(default_factory=list)  # BLOCK_STATUS
    error: OSError | None = None  # first error chunk of a structured reply


class Connection(asyncio.BufferedProtocol):
    """A connection in the transmission phase."""

    def __init__(self, transport: asyncio.Transport, info: ExportInfo) -> None:
        self.transport = transport
        self.info = info
        self.lost: ConnectionLost | None = None
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._out: list[bytes | bytearray | memoryview] = []  # requests of this turn of the loop
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # parsed up to here
        self._end = 0  # received up to here
        # a data payload being received straight into its request's buffer
        self._sink: memoryview | None = None
        self._sink_got = 0
        self._sink_owner: tuple[int, _Pending, bool] | None = None  # cookie, request, last chunk
        self._closed = self._loop.create_future()
        self.handshake_streams: tuple[object, object] | None = None  # kept alive with the transport

    @property
    def read_only(self) -> bool:
        return bool(self.info.flags & p.FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.info.flags & flag)

    # --- sending --------------------------------------------------------------
    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                data: bytes | bytearray | memoryview | None = None,
                buf: bytearray | memoryview | None = None) -> asyncio.Future[Any]:
        """Send one command; the future is its complete reply: READ fills
        `buf` (and gives it), BLOCK_STATUS gives its extents [(length, flags)],
        others None. Raises (or the future does) ConnectionLost."""
        if self.lost is not None:
            raise self.lost
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        fut = self._loop.create_future()
        self._pending[cookie] = _Pending(cmd, offset, length, fut,
                                         memoryview(buf).cast("B") if buf is not None else None)
        # One write per request (header and payload together), and while
        # others are in flight, requests made in one turn of the loop (a burst
        # of FUSE requests) leave in one write at its end: one syscall and one
        # wake-up of the server for all of them. A lone request goes at once
        # (waiting for the end of the turn costs a QD1 client ~10%). No drain:
        # every request waits for its reply, so what the transport buffers is
        # bounded by the requests in flight, and the caller's data outlives
        # the write (the server cannot reply before it has it all).
        hdr = _PACK_REQUEST(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        out = self._out
        if len(self._pending) == 1 and not out:
            if data is not None:
                self.transport.writelines((hdr, data))
            else:
                self.transport.write(hdr)
            return fut
        if not out:
            self._loop.call_soon(self._send)
        out.append(hdr)
        if data is not None:
            out.append(data)
        # A caller that gives up (cancelled) leaves its entry: the reply still
        # comes and must be consumed; the parser drops the entry when it is complete.
        return fut

    def _send(self) -> None:
        out, self._out = self._out, []
        if self.lost is None and out:
            self.transport.writelines(out)

    # --- receiving ------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_got:]
        if len(self._buf) - self._end < COMPACT_BELOW:
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._sink is not None:
                self._sink_got += nbytes
                if self._sink_got == len(self._sink):
                    self._sink = None
                    cookie, pend, last = self._sink_owner  # type: ignore[misc]
                    self._sink_owner = None
                    if last:
                        self._complete(cookie, pend)
                return
            self._end += nbytes
            self._parse()
        except p.ProtocolError as e:
            log.warning("nbd: dropping the connection: %s", e)
            self._lose(ConnectionLost(str(e)))
        except Exception as e:  # a bug here must not leave requests waiting forever
            log.exception("nbd: reply parser failed")
            self._lose(ConnectionLost(f"reply parser failed: {e}"))

    def _compact(self) -> None:
        n = self._end - self._start
        if n:
            self._view[:n] = self._view[self._start:self._end]
        self._start, self._end = 0, n

    def _parse(self) -> None:
        buf, view = self._buf, self._view
        while True:
            start, avail = self._start, self._end - self._start
            if avail < 4:
                break
            magic = _U32(buf, start)[0]
            if magic == p.SIMPLE_REPLY_MAGIC:
                if avail < SIMPLE_SIZE:
                    break
                _, error, cookie = _SIMPLE(buf, start)
                pend = self._take(cookie)
                self._start = start + SIMPLE_SIZE
                if error:
                    self._fail(cookie, pend, _wire_error(error, pend))
                elif pend.cmd == p.CMD_READ and pend.buf is not None:
                    # the data follows at once (no structured replies, or the server chose simple)
                    if not self._payload(cookie, pend, pend.buf[:pend.length], True):
                        break
                else:
                    self._complete(cookie, pend)
            elif magic == p.STRUCTURED_REPLY_MAGIC and self.info.structured:
                if avail < STRUCTURED_SIZE:
                    break
                _, flags, rtype, cookie, length = _STRUCTURED(buf, start)
                pend = self._take(cookie)
                last = bool(flags & p.REPLY_FLAG_DONE)
                if rtype == p.REPLY_TYPE_OFFSET_DATA and pend.buf is not None and length >= 8:
                    if avail < STRUCTURED_SIZE + 8:
                        break
                    rel = _U64(buf, start + STRUCTURED_SIZE)[0] - pend.offset
                    n = length - 8
                    if rel < 0 or rel + n > pend.length:
                        raise p.ProtocolError("data chunk outside the request")
                    self._start = start + STRUCTURED_SIZE + 8
                    if not self._payload(cookie, pend, pend.buf[rel:rel + n], last):
                        break
                    continue
                if length > MAX_CHUNK:
                    raise p.ProtocolError(f"reply chunk of {length} bytes")
                if avail < STRUCTURED_SIZE + length:
                    if STRUCTURED_SIZE + length > len(buf):  # a long chunk: make room for it whole
                        self._grow(STRUCTURED_SIZE + length)
                        buf, view = self._buf, self._view
                    break
                body = start + STRUCTURED_SIZE
                self._start = body + length
                self._chunk(pend, rtype, view[body:body + length])
                if last:
                    if pend.error is not None:
                        self._fail(cookie, pend, pend.error)
                    else:
                        self._complete(cookie, pend)
            else:
                raise p.ProtocolError(f"bad reply magic {magic:#x}")
        if self._start == self._end:
            self._start = self._end = 0

    def _payload(self, cookie: int, pend: _Pending, dest: memoryview, last: bool) -> bool:
        """Data for `dest`: what is already received is copied, the rest is
        received straight into it. False: the rest is still to come."""
        start = self._start
        have = min(self._end - start, len(dest))
        if have:
            dest[:have] = self._view[start:start + have]
            self._start = start + have
        if have == len(dest):
            if last:
                self._complete(cookie, pend)
            return True
        self._sink, self._sink_got, self._sink_owner = dest[have:], 0, (cookie, pend, last)
        return False

    def _chunk(self, pend: _Pending, rtype: int, payload: memoryview) -> None:
        if rtype == p.REPLY_TYPE_OFFSET_HOLE and pend.buf is not None:
            off, n = p.OFFSET_HOLE_PAYLOAD.unpack(payload)
            rel = off - pend.offset
            if rel < 0 or rel + n > pend.length:
                raise p.ProtocolError("hole chunk outside the request")
            pend.buf[rel:rel + n] = bytes(n)  # the buffer may be reused: zero it
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS and pend.cmd == p.CMD_BLOCK_STATUS:
            ctx, extents = p.unpack_block_status(bytes(payload))
            if ctx == self.info.context_id:
                pend.extents.extend(extents)
        elif p.reply_type_is_error(rtype):
            err, msg, _ = p.unpack_error_payload(bytes(payload))
            if pend.error is None:
                pend.error = _wire_error(err, pend, msg)
        elif rtype != p.REPLY_TYPE_NONE:
            raise p.ProtocolError(f"unexpected reply chunk type {rtype} for command {pend.cmd}")

    def _grow(self, size: int) -> None:
        n = self._end - self._start
        new = bytearray(max(size, len(self._buf)))
        new[:n] = self._view[self._start:self._end]
        self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, n

    def _take(self, cookie: int) -> _Pending:
        pend = self._pending.get(cookie)
        if pend is None:
            raise p.ProtocolError(f"reply for unknown cookie {cookie}")
        return pend

    def _complete(self, cookie: int, pend: _Pending) -> None:
        del self._pending[cookie]
        if not pend.future.done():  # done: the caller gave up (cancelled)
            if pend.cmd == p.CMD_BLOCK_STATUS:
                pend.future.set_result(pend.extents)
            else:
                pend.future.set_result(pend.buf)

    def _fail(self, cookie: int, pend: _Pending, exc: BaseException) -> None:
        del self._pending[cookie]
        if not pend.future.done():
            pend.future.set_exception(exc)

    # --- the end --------------------------------------------------------------
    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(ConnectionLost("server closed the connection" if exc is None else f"connection lost: {exc}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _lose(self, exc: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = exc
        pending, self._pending = self._pending, {}
        for pend in pending.values():
            if not pend.future.done():
                pend.future.set_exception(self.lost)
                pend.future.exception()  # retrieved: a cancelled caller must not log it
        self._sink = self._sink_owner = None
        self.transport.close()

    def fed(self, data: bytes) -> None:
        """Bytes the handshake's reader had already received past the handshake."""
        while data:
            dest = self.get_buffer(len(data))
            n = min(len(dest), len(data))
            dest[:n] = data[:n]
            data = data[n:]
            self.buffer_updated(n)

    async def close(self) -> None:
        """NBD_CMD_DISC (no reply), then close; requests still in flight fail."""
        if self.lost is None:
            with contextlib.suppress(Exception):
                self.transport.write(_PACK_REQUEST(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self._lose(ConnectionLost("connection closed"))  # close() flushes what is buffered first
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), 1)
        if not self._closed.done():
            self.transport.abort()


def _wire_error(nbd_errno: int, pend: _Pending, msg: str = "") -> OSError:
    host = p.nbd_to_errno(nbd_errno) or errno.EIO
    name = p.CMD_NAMES.get(pend.cmd, str(pend.cmd))
    text = f"NBD {name} at {pend.offset}+{pend.length} failed" + (f": {msg}" if msg else "")
    return OSError(host, text)
