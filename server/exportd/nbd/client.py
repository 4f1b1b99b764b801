"""The NBD client side of the wire: one connection to a server.

`connect()` opens a UNIX or TCP stream, does the fixed newstyle handshake
(STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO with INFO
BLOCK_SIZE; EXPORT_NAME when the server knows no GO) and returns a
`Connection` in the transmission phase. Commands are coroutines; any number
may be in flight at once: each gets a cookie, one reader task matches the
replies (simple or structured, in any order) to their requests.

When the stream ends or the server breaks the protocol, every request in
flight and every later one raises `ConnectionLost`; what to do then
(EIO, or reconnect and retry) is the block driver's choice (block/nbd.py).
Errors the server reports for one request are OSError with the host errno.

Facts from NetworkBlockDevice's doc/proto.md; names from exportd.nbd.protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from exportd.nbd import protocol as p
from exportd.tls import TlsError, upgrade

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOCK = 32 << 20  # proto.md: without INFO BLOCK_SIZE, 32 MiB is safe
MAX_OPTION_REPLY = 1 << 20  # no option reply we ask for comes near this


class ConnectionLost(Exception):
    """The connection ended (or is unusable); requests on it did not complete."""


class HandshakeError(Exception):
    """The server refused or botched the handshake; the text says why (QEMU-like)."""


@dataclass
class Address:
    """Where the server listens: QEMU's SocketAddress (unix or inet)."""

    kind: str  # "unix" or "inet"
    path: str = ""
    host: str = ""
    port: str = ""
    tls: ssl.SSLContext | None = None  # NBD_OPT_STARTTLS first, with this context
    tls_hostname: str | None = None  # the name the server's certificate must carry

    def describe(self) -> str:
        return self.path if self.kind == "unix" else f"{self.host}:{self.port}"


@dataclass
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    structured: bool = False
    context_id: int | None = None  # base:allocation, when the server agreed


@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int
    future: asyncio.Future[Any]
    buf: bytearray | memoryview | None = None  # READ: where data chunks land (request-relative)
    extents: list[tuple[int, int]] = field(default_factory=list)  # BLOCK_STATUS
    error: OSError | None = None  # first error chunk of a structured reply


async def open_stream(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 1 << 20
    if address.kind == "unix":
        reader, writer = await asyncio.open_unix_connection(address.path, limit=limit)
    else:
        reader, writer = await asyncio.open_connection(address.host, int(address.port), limit=limit)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # small requests must not wait for Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def connect(address: Address, export: str) -> Connection:
    """A connection to `export` on the server at `address`, handshake done.
    Raises OSError (cannot connect), HandshakeError, or ConnectionLost."""
    reader, writer = await open_stream(address)
    try:
        info = await _handshake(reader, writer, export, address)
    except p.ProtocolError as e:
        writer.close()
        raise HandshakeError(f"Server sent garbage during the handshake: {e}") from None
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, info)


# --- handshake --------------------------------------------------------------------
async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise ConnectionLost("server closed the connection") from e


async def _option(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opt: int,
                  data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option and collect its replies up to the final one (ACK or an
    error): [(reply type, payload), ...]."""
    writer.write(p.pack_option(opt, data))
    await writer.drain()
    replies = []
    while True:
        hdr = p.unpack_option_reply_header(await _read(reader, p.OPTION_REPLY_HEADER.size))
        if hdr.option != opt:
            raise HandshakeError(f"Unexpected option in reply: expected {opt}, got {hdr.option}")
        if hdr.length > MAX_OPTION_REPLY:
            raise HandshakeError(f"server's reply to option {opt} is too long")
        payload = await _read(reader, hdr.length)
        replies.append((hdr.reply, payload))
        if hdr.reply == p.REP_ACK or hdr.reply & p.REP_FLAG_ERROR:
            return replies


def _server_error(reply: int, payload: bytes) -> str:
    msg = payload.decode(errors="replace")
    return f" (server says: {msg})" if msg else ""


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     export: str, address: Address) -> ExportInfo:
    magic, opt_magic, hflags = p.HANDSHAKE.unpack(await _read(reader, p.HANDSHAKE.size))
    if magic != p.NBDMAGIC:
        raise HandshakeError("Invalid magic received")
    if opt_magic != p.IHAVEOPT:
        raise HandshakeError("Server does not support the fixed newstyle protocol")  # oldstyle
    if not hflags & p.FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("Server does not support the fixed newstyle protocol")
    cflags = p.FLAG_C_FIXED_NEWSTYLE | (hflags & p.FLAG_NO_ZEROES)
    writer.write(p.CLIENT_FLAGS.pack(cflags))
    if address.tls is not None:
        rep, payload = (await _option(reader, writer, p.OPT_STARTTLS))[-1]
        if rep != p.REP_ACK:
            raise HandshakeError(f"Server don't support STARTTLS option{_server_error(rep, payload)}")
        try:
            await upgrade(writer, address.tls, server_side=False, server_hostname=address.tls_hostname)
        except TlsError as e:
            raise HandshakeError(str(e)) from None

    rep, _ = (await _option(reader, writer, p.OPT_STRUCTURED_REPLY))[-1]
    structured = rep == p.REP_ACK

    context_id = None
    if structured:
        replies = await _option(reader, writer, p.OPT_SET_META_CONTEXT,
                                p.pack_meta_context_query(export, [p.CONTEXT_BASE_ALLOCATION]))
        for rep, payload in replies:
            if rep == p.REP_META_CONTEXT and len(payload) >= 4:
                if payload[4:].decode(errors="replace") == p.CONTEXT_BASE_ALLOCATION:
                    context_id = p.U32.unpack_from(payload)[0]

    info = ExportInfo(size=-1, flags=0, structured=structured, context_id=context_id)
    replies = await _option(reader, writer, p.OPT_GO, p.pack_go(export, [p.INFO_BLOCK_SIZE]))
    rep, payload = replies[-1]
    if rep == p.REP_ERR_UNSUP:
        # a server from before GO: EXPORT_NAME ends negotiation with no way to refuse
        writer.write(p.pack_option(p.OPT_EXPORT_NAME, export.encode()))
        size, tflags = p.EXPORT_NAME_REPLY.unpack(await _read(reader, p.EXPORT_NAME_REPLY.size))
        if not hflags & p.FLAG_NO_ZEROES:
            await _read(reader, p.EXPORT_NAME_ZEROES)
        info.size, info.flags = size, tflags
        return info
    if rep == p.REP_ERR_UNKNOWN:
        raise HandshakeError("Requested export not available")  # QEMU keeps the server text for a hint
    if rep == p.REP_ERR_TLS_REQD:
        raise HandshakeError(f"Server requires TLS{_server_error(rep, payload)}")
    if rep & p.REP_FLAG_ERROR:
        raise HandshakeError(f"Server refused export '{export}' (error {rep & 0xFFFF})"
                             f"{_server_error(rep, payload)}")
    for rep, payload in replies[:-1]:
        if rep != p.REP_INFO or len(payload) < 2:
            continue
        (kind,) = p.U16.unpack_from(payload)
        if kind == p.INFO_EXPORT and len(payload) == p.INFO_EXPORT_PAYLOAD.size:
            _, info.size, info.flags = p.INFO_EXPORT_PAYLOAD.unpack(payload)
        elif kind == p.INFO_BLOCK_SIZE and len(payload) == p.INFO_BLOCK_SIZE_PAYLOAD.size:
            _, mn, pref, mx = p.INFO_BLOCK_SIZE_PAYLOAD.unpack(payload)
            if mn and mn & (mn - 1) == 0 and mn <= 65536:
                info.min_block, info.pref_block = mn, max(pref, mn)
                info.max_block = max(mn, mx - mx % mn) if mx else DEFAULT_MAX_BLOCK
    if info.size < 0:
        raise HandshakeError("server sent no export information before its ACK")
    return info


# --- transmission -------------------------------------------------------------------
class Connection:
    """A connection in the transmission phase."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ExportInfo) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self.lost: ConnectionLost | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    @property
    def read_only(self) -> bool:
        return bool(self.info.flags & p.FLAG_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.info.flags & flag)

    # --- sending --------------------------------------------------------------
    async def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                      data: bytes | bytearray | memoryview | None = None,
                      buf: bytearray | memoryview | None = None) -> Any:
        """Send one command and wait for its complete reply: READ fills `buf`,
        BLOCK_STATUS returns its extents [(length, flags)], others None."""
        if self.lost is not None:
            raise self.lost
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pend = _Pending(cmd, offset, length, fut, buf=buf)
        self._pending[cookie] = pend
        # header and payload in one buffered write: no other request can come between
        hdr = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if data is not None:
            self.writer.writelines((hdr, data))
        else:
            self.writer.write(hdr)
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self._lose(ConnectionLost(f"send failed: {e}"))
        # A caller that gives up (cancelled) leaves its entry: the reply still
        # comes and must be consumed; the reader drops the entry when it is complete.
        return await fut

    # --- receiving ------------------------------------------------------------
    async def _read_replies(self) -> None:
        try:
            while True:
                magic = p.U32.unpack(await _read(self.reader, 4))[0]
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == p.STRUCTURED_REPLY_MAGIC and self.info.structured:
                    await self._chunk()
                else:
                    raise p.ProtocolError(f"bad reply magic {magic:#x}")
        except ConnectionLost as e:
            self._lose(e)
        except (p.ProtocolError, OSError) as e:
            log.warning("nbd: dropping the connection: %s", e)
            self._lose(ConnectionLost(str(e)))
        except asyncio.CancelledError:
            self._lose(ConnectionLost("connection closed"))
            raise
        except Exception as e:  # a bug here must not leave requests waiting forever
            log.exception("nbd: reply reader failed")
            self._lose(ConnectionLost(f"reply reader failed: {e}"))

    def _take(self, cookie: int) -> _Pending:
        pend = self._pending.get(cookie)
        if pend is None:
            raise p.ProtocolError(f"reply for unknown cookie {cookie}")
        return pend

    def _finish(self, cookie: int, pend: _Pending, result: Any = None, exc: BaseException | None = None) -> None:
        del self._pending[cookie]
        if pend.future.done():  # the caller gave up (cancelled)
            return
        if exc is not None:
            pend.future.set_exception(exc)
        else:
            pend.future.set_result(result)

    async def _simple_reply(self) -> None:
        error, cookie = p.SIMPLE_REPLY.unpack(b"\0\0\0\0" + await _read(self.reader, 12))[1:]
        pend = self._take(cookie)
        if error:
            self._finish(cookie, pend, exc=_wire_error(error, pend))
            return
        if pend.cmd == p.CMD_READ and pend.buf is not None:
            # the data follows at once (no structured replies, or the server chose simple)
            view = memoryview(pend.buf)
            got = 0
            while got < pend.length:
                chunk = await self.reader.read(min(pend.length - got, 1 << 20))
                if not chunk:
                    raise ConnectionLost("server closed the connection mid-read")
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        self._finish(cookie, pend, pend.buf)

    async def _chunk(self) -> None:
        flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack(
            p.U32.pack(p.STRUCTURED_REPLY_MAGIC) + await _read(self.reader, p.STRUCTURED_REPLY.size - 4))[1:]
        pend = self._take(cookie)
        if rtype == p.REPLY_TYPE_OFFSET_DATA and pend.buf is not None and length >= 8:
            (off,) = p.U64.unpack(await _read(self.reader, 8))
            n = length - 8
            start = off - pend.offset
            if start < 0 or start + n > pend.length:
                raise p.ProtocolError("data chunk outside the request")
            view = memoryview(pend.buf)
            got = 0
            while got < n:  # straight into the request's buffer
                chunk = await self.reader.read(min(n - got, 1 << 20))
                if not chunk:
                    raise ConnectionLost("server closed the connection mid-read")
                view[start + got:start + got + len(chunk)] = chunk
                got += len(chunk)
        else:
            payload = await _read(self.reader, length)
            if rtype == p.REPLY_TYPE_OFFSET_HOLE and pend.buf is not None:
                off, n = p.OFFSET_HOLE_PAYLOAD.unpack(payload)
                start = off - pend.offset
                if start < 0 or start + n > pend.length:
                    raise p.ProtocolError("hole chunk outside the request")
                pend.buf[start:start + n] = bytes(n)  # the buffer may be reused: zero it
            elif rtype == p.REPLY_TYPE_BLOCK_STATUS and pend.cmd == p.CMD_BLOCK_STATUS:
                ctx, extents = p.unpack_block_status(payload)
                if ctx == self.info.context_id:
                    pend.extents.extend(extents)
            elif p.reply_type_is_error(rtype):
                err, msg, _ = p.unpack_error_payload(payload)
                if pend.error is None:
                    pend.error = _wire_error(err, pend, msg)
            elif rtype != p.REPLY_TYPE_NONE:
                raise p.ProtocolError(f"unexpected reply chunk type {rtype} for command {pend.cmd}")
        if flags & p.REPLY_FLAG_DONE:
            if pend.error is not None:
                self._finish(cookie, pend, exc=pend.error)
            else:
                self._finish(cookie, pend, pend.extents if pend.cmd == p.CMD_BLOCK_STATUS else pend.buf)

    # --- the end --------------------------------------------------------------
    def _lose(self, exc: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = exc
        for pend in list(self._pending.values()):
            if not pend.future.done():
                pend.future.set_exception(self.lost)
        self._pending.clear()
        self.writer.close()

    async def close(self) -> None:
        """NBD_CMD_DISC (no reply), then close; requests still in flight fail."""
        if self.lost is None:
            with contextlib.suppress(Exception):
                self.writer.write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
                await asyncio.wait_for(self.writer.drain(), 1)
        self._reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self._reader_task
        self._lose(ConnectionLost("connection closed"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1)


def _wire_error(nbd_errno: int, pend: _Pending, msg: str = "") -> OSError:
    host = p.nbd_to_errno(nbd_errno) or errno.EIO
    name = p.CMD_NAMES.get(pend.cmd, str(pend.cmd))
    text = f"NBD {name} at {pend.offset}+{pend.length} failed" + (f": {msg}" if msg else "")
    return OSError(host, text)
