"""The NBD client side of the wire: one connection to a server.

`connect()` opens a UNIX or TCP stream, does the fixed newstyle handshake
(STARTTLS when asked, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation,
GO with INFO BLOCK_SIZE; EXPORT_NAME when the server knows no GO) on
asyncio streams, then hands the transport to a `Connection`
(client_transmission.py), the protocol of the transmission phase.

Facts from NetworkBlockDevice's doc/proto.md; names from exportd.nbd.protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from dataclasses import dataclass

from exportd.nbd import protocol as p
from exportd.nbd.client_transmission import Connection, ConnectionLost, ExportInfo
from exportd.tls import TlsError, upgrade

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOCK = ExportInfo.max_block  # proto.md: without INFO BLOCK_SIZE, 32 MiB is safe
SEND_BUFFER = 2 << 20  # SO_SNDBUF asked (the kernel doubles it): a 1 MiB WRITE and more
MAX_OPTION_REPLY = 1 << 20  # no option reply we ask for comes near this


class HandshakeError(Exception):
    """The server refused or botched the handshake; the text says why (QEMU-like)."""


@dataclass
class Address:
    """Where the server listens: QEMU's SocketAddress (unix or inet)."""

    kind: str  # "unix", "inet" or "fd"
    path: str = ""
    host: str = ""
    port: str = ""
    tls: ssl.SSLContext | None = None  # NBD_OPT_STARTTLS first, with this context
    tls_hostname: str | None = None  # the name the server's certificate must carry
    fd_name: str = ""  # kind "fd": the descriptor's name (getfd) or number
    connected: socket.socket | None = None  # kind "fd": the socket, until the first connection takes it

    def describe(self) -> str:
        if self.kind == "fd":
            return f"fd {self.fd_name}"
        return self.path if self.kind == "unix" else f"{self.host}:{self.port}"


async def open_stream(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 1 << 20
    if address.kind == "fd":
        # A connected socket handed over once: like QEMU, which took it out
        # of the monitor, a later reconnect has nothing to connect with.
        sock, address.connected = address.connected, None
        if sock is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "the socket passed as a descriptor was used up")
        try:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=limit)
            else:
                reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
    elif address.kind == "unix":
        reader, writer = await asyncio.open_unix_connection(address.path, limit=limit)
    else:
        reader, writer = await asyncio.open_connection(address.host, int(address.port), limit=limit)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # a 1 MiB WRITE leaves in one send, not in ~200 KiB pieces each
            # waiting for the server to drain the socket (capped at wmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # small requests must not wait for Nagle
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
    return _transmission(reader, writer, info)


def _transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ExportInfo) -> Connection:
    """The stream's transport, handed from the handshake's StreamReader to a
    Connection (with anything the reader already holds past the handshake)."""
    leftover = bytes(reader._buffer)  # type: ignore[attr-defined]  # asyncio keeps it there
    reader._buffer.clear()  # type: ignore[attr-defined]
    transport = writer.transport
    conn = Connection(transport, info)  # type: ignore[arg-type]
    conn.handshake_streams = (reader, writer)  # a collected StreamWriter closes its transport
    transport.set_protocol(conn)
    if leftover:
        conn.fed(leftover)
    if transport.is_closing() or reader.at_eof():
        conn.connection_lost(None)
    return conn


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
