"""Protocol driver `nbd`: a node whose bytes live on an NBD server
(QEMU's BlockdevOptionsNbd: server, export, tls-creds, reconnect-delay,
open-timeout).

One connection (exportd.nbd.client) carries every request, many in flight.
Reads are sparse (holes come back as OFFSET_HOLE chunks, not data), block
status comes from the server's base:allocation context (so SEEK_DATA and
SEEK_HOLE on an export of this node tell the server's truth), FUA, flush,
trim and write-zeroes are passed through when the server offers them.

When the connection is lost: with reconnect-delay 0 (the default) every
request in flight and every later one fails with EIO. With a delay, the
node reconnects in the background (as long as it lives); requests wait up
to `reconnect-delay` seconds from the loss and are then re-sent on the new
connection, after that they fail with EIO until a reconnect succeeds (as
QEMU). open-timeout: the first connection is retried until it succeeds or
that many seconds have passed (0: one attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from exportd.block import register_driver
from exportd.block.node import BlockNode, BlockStatus, Status
from exportd.errors import BlockError
from exportd.monitor.fdpass import socket_fd
from exportd.nbd import protocol as p
from exportd.nbd.client import Address, Connection, ConnectionLost, HandshakeError, connect

log = logging.getLogger(__name__)

NBD_MEMBERS = frozenset({"server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap",
                         "reconnect-delay", "open-timeout"})
RETRY_MIN_S = 0.05  # first pause between reconnect attempts, doubled up to RETRY_MAX_S
RETRY_MAX_S = 1.0
STATUS_MAX = 1 << 31  # asked at most per BLOCK_STATUS (the length is 32 bits)
# One connection attempt (connect + handshake) that takes longer than this is
# abandoned, so that a server which accepts and then says nothing cannot hold
# blockdev-add (and with it the monitor) or the reconnect loop forever.
ATTEMPT_LIMIT_S = 30.0

T = TypeVar("T")


def parse_address(server: Any) -> Address:
    """QEMU's SocketAddress (flat: type + members) as an Address."""
    if not isinstance(server, dict):
        raise BlockError("Invalid parameter type for 'server', expected: SocketAddress")
    kind = server.get("type")
    if kind == "unix":
        path = server.get("path")
        if not isinstance(path, str):
            raise BlockError("Parameter 'server.path' is missing")
        if server.get("abstract"):
            raise BlockError("exportd does not support abstract UNIX socket addresses")
        return Address("unix", path=path)
    if kind == "inet":
        host, port = server.get("host"), server.get("port")
        if not isinstance(host, str):
            raise BlockError("Parameter 'server.host' is missing")
        if not isinstance(port, str):
            raise BlockError("Parameter 'server.port' is missing")
        return Address("inet", host=host, port=port)
    if kind == "fd":
        name = server.get("str")
        if not isinstance(name, str):
            raise BlockError("Parameter 'server.str' is missing")
        sock = socket.socket(fileno=socket_fd(name))
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise BlockError(f"File descriptor '{name}' is not a stream socket")
        return Address("fd", fd_name=name, connected=sock)
    if kind == "vsock":
        raise BlockError(f"exportd does not support NBD servers at a SocketAddress of type '{kind}'")
    raise BlockError("Parameter 'server.type' is missing" if kind is None
                     else f"Parameter 'server.type' does not accept value '{kind}'")


def nbd_filename(address: Address, export: str | None) -> str:
    """The node's file name as QEMU writes it (an NBD URI)."""
    if address.kind == "fd":  # no URI names a descriptor: QEMU falls back to json:
        server = {"type": "fd", "str": address.fd_name}
        return "json:" + json.dumps({"driver": "nbd", "server": server} | ({"export": export} if export else {}))
    if address.kind == "unix":
        return f"nbd+unix:///{export}?socket={address.path}" if export else f"nbd+unix://?socket={address.path}"
    return f"nbd://{address.host}:{address.port}/{export}" if export else f"nbd://{address.host}:{address.port}"


def _as_oserror(e: BaseException, address: Address) -> str:
    if isinstance(e, OSError):
        return f"Failed to connect to '{address.describe()}': {e.strerror or e}"
    return str(e)


@register_driver
class NbdNode(BlockNode):
    driver = "nbd"
    option_members = NBD_MEMBERS

    def __init__(self, node_name: str, *, read_only: bool, address: Address, export: str | None,
                 conn: Connection, reconnect_delay: int) -> None:
        super().__init__(node_name, read_only=read_only)
        self.address = address
        self.export = export
        self.conn: Connection | None = conn
        self.size = conn.info.size
        self.reconnect_delay = reconnect_delay
        self.request_alignment = conn.info.min_block
        self._connected = asyncio.Event()
        self._connected.set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._lost_at = 0.0
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()  # old connections being closed

    # --- opening ----------------------------------------------------------------
    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> NbdNode:
        address = parse_address(options.get("server"))
        try:
            export = options.get("export")
            if export is not None and not isinstance(export, str):
                raise BlockError("Invalid parameter type for 'export', expected: string")
            if len((export or "").encode()) > p.MAX_STRING:
                raise BlockError("export name too long to send to a server")
            if options.get("tls-creds") is not None:
                address = _with_tls(graph, address, options["tls-creds"], options.get("tls-hostname"))
            if options.get("x-dirty-bitmap") is not None:
                raise BlockError("exportd's nbd driver does not support x-dirty-bitmap")
            delay = _uint32(options, "reconnect-delay")
            # a socket passed as a descriptor gets one try: there is no other
            timeout = _uint32(options, "open-timeout") if address.kind != "fd" else 0
            conn = await _first_connection(address, export or "", timeout)
        finally:
            if address.connected is not None:  # not taken by a connection: ours to close
                address.connected.close()
                address.connected = None
        read_only = options["read-only"]
        if conn.read_only and not read_only:
            if not options.get("auto-read-only", False):
                await conn.close()
                raise BlockError("Could not open image: Permission denied")  # qemu-storage-daemon 7.2's text
            read_only = True
        return cls(node_name, read_only=read_only, address=address, export=export, conn=conn,
                   reconnect_delay=delay)

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnecting
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        self._connected.set()  # wake waiters: they see _closed and fail

    # --- the connection and its loss ----------------------------------------------
    async def _run(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """Run one request, riding out a lost connection as reconnect-delay says."""
        while True:
            conn = self.conn
            if conn is None or conn.lost is not None:
                conn = await self._wait_connected()
            try:
                return await op(conn)
            except ConnectionLost:
                self._connection_lost(conn)

    async def _one(self, op: Callable[[Connection], Awaitable[T]], cmd: int, offset: int, length: int,
                   **kw: Any) -> Any:
        """`_run(op)` for an op that is one request on this connection: sent
        straight away while the connection is up (the common case, without
        _run's loop), `_run(op)` itself after a loss (a new connection may
        cut it differently)."""
        conn = self.conn
        if conn is not None and conn.lost is None:
            try:
                return await conn.request(cmd, offset, length, **kw)
            except ConnectionLost:
                self._connection_lost(conn)
        return await self._run(op)

    def _connection_lost(self, conn: Connection) -> None:
        if self.conn is not conn or self._closed:
            return  # already handled (another request saw it first), or closing
        log.warning("nbd node %s: lost the connection to %s", self.node_name, self.address.describe())
        self.conn = None
        self._connected.clear()
        self._lost_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        # a socket passed as a descriptor was the only one: nothing to reconnect with
        if self.reconnect_delay and not self._closed and self.address.kind != "fd":
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _wait_connected(self) -> Connection:
        if self._closed:
            raise OSError(errno.EIO, "nbd node is closed")
        if self.conn is None and (not self.reconnect_delay or self.address.kind == "fd"):
            raise OSError(errno.EIO, f"NBD server {self.address.describe()} is gone")
        left = self._lost_at + self.reconnect_delay - time.monotonic()
        if self.conn is None and left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), left)
        if self.conn is None or self._closed:
            raise OSError(errno.EIO, f"NBD server {self.address.describe()} is gone")
        return self.conn

    async def _reconnect(self) -> None:
        pause = RETRY_MIN_S
        while not self._closed:
            try:
                conn = await asyncio.wait_for(connect(self.address, self.export or ""), ATTEMPT_LIMIT_S)
            except (OSError, HandshakeError, ConnectionLost, TimeoutError) as e:
                log.debug("nbd node %s: reconnect failed: %s", self.node_name, e)
            else:
                if conn.info.size == self.size and not (conn.read_only and not self.read_only):
                    self.conn = conn
                    self.request_alignment = conn.info.min_block
                    self._connected.set()
                    log.warning("nbd node %s: reconnected", self.node_name)
                    return
                log.warning("nbd node %s: the export changed (size or read-only) across reconnect",
                            self.node_name)
                await conn.close()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    # --- I/O ------------------------------------------------------------------
    def getlength(self) -> int:
        return self.size

    def filename(self) -> str:
        return nbd_filename(self.address, self.export)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "request beyond the end of the NBD export")

    def _pieces(self, offset: int, length: int, conn: Connection) -> list[tuple[int, int]]:
        step = conn.info.max_block
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check_range(offset, length)
        if length == 0:
            return b""
        align = self.request_alignment
        start = offset - offset % align
        end = min(-(-(offset + length) // align) * align, self.size)
        buf = bytearray(end - start)
        whole = memoryview(buf)

        async def go(conn: Connection) -> None:
            await _all([
                conn.request(p.CMD_READ, o, n, buf=whole[o - start:o - start + n])
                for o, n in self._pieces(start, end - start, conn)])

        conn = self.conn
        if conn is not None and end - start <= conn.info.max_block:
            await self._one(go, p.CMD_READ, start, end - start, buf=whole)
        else:
            await self._run(go)
        if start == offset and end == offset + length:
            return buf
        return memoryview(buf)[offset - start:offset - start + length]

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        length = len(data)
        self._check_range(offset, length)
        if length == 0:
            return
        align = self.request_alignment
        if offset % align or length % align:
            # read-modify-write of the partial blocks (servers with a minimum block size)
            start = offset - offset % align
            end = min(-(-(offset + length) // align) * align, self.size)
            whole = bytearray(await self.read(start, end - start))
            whole[offset - start:offset - start + length] = data
            offset, data, length = start, whole, end - start
        view = memoryview(data).cast("B")

        async def go(conn: Connection) -> None:
            flags = p.CMD_FLAG_FUA if fua and conn.can(p.FLAG_SEND_FUA) else 0
            await _all([
                conn.request(p.CMD_WRITE, o, n, flags=flags, data=view[o - offset:o - offset + n])
                for o, n in self._pieces(offset, length, conn)])
            if fua and not flags and conn.can(p.FLAG_SEND_FLUSH):
                await conn.request(p.CMD_FLUSH)

        conn = self.conn
        if conn is not None and length <= conn.info.max_block and (not fua or conn.can(p.FLAG_SEND_FUA)):
            await self._one(go, p.CMD_WRITE, offset, length, flags=p.CMD_FLAG_FUA if fua else 0, data=view)
        else:
            await self._run(go)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return

        async def go(conn: Connection) -> bool:
            if not conn.can(p.FLAG_SEND_WRITE_ZEROES):
                return False
            flags = 0 if may_unmap else p.CMD_FLAG_NO_HOLE
            step = 1 << 30  # the length field is 32 bits; stay well inside it
            await _all([
                conn.request(p.CMD_WRITE_ZEROES, o, min(step, offset + length - o), flags=flags)
                for o in range(offset, offset + length, step)])
            return True

        if not await self._run(go):
            await super().write_zeroes(offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only or length == 0:
            return
        self._check_range(offset, length)

        async def go(conn: Connection) -> None:
            if not conn.can(p.FLAG_SEND_TRIM):
                return  # advisory
            step = 1 << 30
            await _all([
                conn.request(p.CMD_TRIM, o, min(step, offset + length - o))
                for o in range(offset, offset + length, step)])

        await self._run(go)

    async def flush(self) -> None:
        async def go(conn: Connection) -> None:
            if conn.can(p.FLAG_SEND_FLUSH):
                await conn.request(p.CMD_FLUSH)

        await self._run(go)

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "nbd node is read-only")

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        if offset >= self.size:
            return BlockStatus(Status.ZERO | Status.EOF, max(length, 1))
        n = min(length, self.size - offset, STATUS_MAX)

        async def go(conn: Connection) -> tuple[Status, int]:
            if conn.info.context_id is None:
                return Status.DATA, n  # no base:allocation: everything is data
            extents = await conn.request(p.CMD_BLOCK_STATUS, offset, n, flags=p.CMD_FLAG_REQ_ONE)
            if not extents or extents[0][0] == 0:
                raise OSError(errno.EIO, "NBD server sent no block status")
            ln, fl = extents[0]
            st = Status(0) if fl & p.STATE_HOLE else Status.DATA
            if fl & p.STATE_ZERO:
                st |= Status.ZERO
            return st, min(ln, n)

        st, count = await self._run(go)
        if offset + count >= self.size:
            st |= Status.EOF
        return BlockStatus(st | Status.ALLOCATED, count)


def _all(requests: list[asyncio.Future[Any]]) -> Awaitable[Any]:
    """Wait for every request of one operation (one alone, without a gather)."""
    return requests[0] if len(requests) == 1 else asyncio.gather(*requests)


def _uint32(options: dict[str, Any], key: str) -> int:
    value = options.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockError(f"Invalid parameter type for '{key}', expected: integer")
    if not 0 <= value < 1 << 32:
        raise BlockError(f"Parameter '{key}' expects uint32_t")
    return value


def _with_tls(graph: Any, address: Address, creds_id: str, hostname: str | None) -> Address:
    """The address with the TLS context of the tls-creds-x509 object
    `creds_id` (endpoint client); the certificate must name tls-hostname,
    else the host of an inet address, as in QEMU."""
    from exportd.objects import tls_creds
    from exportd.tls import TlsError

    hostname = hostname or (address.host if address.kind == "inet" else None)
    try:
        ctx = tls_creds(graph.daemon, creds_id, "client").client_context(hostname)
    except TlsError as e:
        raise BlockError(str(e)) from None
    return dataclasses.replace(address, tls=ctx, tls_hostname=hostname)


async def _first_connection(address: Address, export: str, timeout: int) -> Connection:
    """connect(), retried until `timeout` seconds have passed (0: one try)."""
    deadline = time.monotonic() + timeout
    pause = RETRY_MIN_S
    refused: OSError | ConnectionLost | None = None  # the last attempt that failed by itself
    while True:
        left = deadline - time.monotonic()
        try:
            limit = min(max(left, 0.001), ATTEMPT_LIMIT_S) if timeout else ATTEMPT_LIMIT_S
            return await asyncio.wait_for(connect(address, export), limit)
        except HandshakeError as e:
            raise BlockError(str(e)) from None
        except (OSError, ConnectionLost, TimeoutError) as e:
            if isinstance(e, TimeoutError) and timeout and refused is not None and limit < RETRY_MAX_S:
                # an attempt started just before the deadline and cut short by
                # it says nothing about the server: report why the ones before failed
                e = refused
            elif not isinstance(e, TimeoutError):
                refused = e
            left = deadline - time.monotonic()
            if left <= 0 or (isinstance(e, TimeoutError) and not timeout):
                if isinstance(e, TimeoutError):
                    raise BlockError(f"Failed to connect to '{address.describe()}': "
                                     "no answer from the server in time") from None
                if isinstance(e, ConnectionLost):
                    raise BlockError(f"Failed to read initial magic: {e}") from None
                raise BlockError(_as_oserror(e, address)) from None
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, RETRY_MAX_S)
