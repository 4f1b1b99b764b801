"""The NBD server: listeners, connection limits, and the server's life cycle
(nbd-server-start / nbd-server-stop). One connection's protocol is in
nbd/connection.py; the export type that registers names here is
export/nbd.py.

Everything runs on the daemon's one loop, next to QMP and FUSE. A client
is a task; whatever it does (garbage, a stall, a disconnect mid-request)
ends that task only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any

from exportd import fdreserve
from exportd.errors import QMPError
from exportd.monitor.fdpass import socket_fd
from exportd.monitor.server import LISTEN_BACKLOG

if TYPE_CHECKING:
    from exportd.export.nbd import NbdExport
    from exportd.nbd.connection import Connection

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 100      # QEMU 9.x's default (0: no limit)
DEFAULT_HANDSHAKE_MAX_SECONDS = 10  # QEMU 9.1's default (0: no limit)


class NbdServer:
    """The daemon's one NBD server (QEMU has one per process too)."""

    def __init__(self, daemon: Any, *, tls: ssl.SSLContext | None = None, tls_authz: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 handshake_max_seconds: int = DEFAULT_HANDSHAKE_MAX_SECONDS) -> None:
        self.daemon = daemon
        self.tls = tls
        # the authz object asked about each TLS client's certificate (looked
        # up by id at each check, as QEMU); None: no check
        self.tls_authz = tls_authz
        self.max_connections = max_connections
        self.handshake_max_seconds = handshake_max_seconds
        self.exports: dict[str, NbdExport] = {}   # export name -> export
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_path: str | None = None

    # --- listening ------------------------------------------------------------
    async def listen(self, addr: dict[str, Any]) -> None:
        """Listen on a SocketAddressLegacy ({"type": ..., "data": {...}})."""
        kind, data = addr["type"], addr.get("data", {})
        try:
            if kind == "unix":
                path = data["path"]
                with contextlib.suppress(FileNotFoundError):
                    if os.path.exists(path) and not os.path.isdir(path):
                        os.unlink(path)  # QEMU unlinks whatever is there too
                srv = await asyncio.start_unix_server(self._accept, path=path, limit=1 << 20, backlog=LISTEN_BACKLOG)
                self._unix_path = path
            elif kind == "inet":
                host = data.get("host") or None
                srv = await asyncio.start_server(self._accept, host=host, port=int(data["port"]),
                                                 reuse_address=True, limit=1 << 20, backlog=LISTEN_BACKLOG)
            elif kind == "fd":
                sock = socket.socket(fileno=socket_fd(data["str"]))  # ours from here on
                try:
                    if sock.type != socket.SOCK_STREAM:
                        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
                    sock.setblocking(False)
                    if sock.family == socket.AF_UNIX:
                        srv = await asyncio.start_unix_server(self._accept, sock=sock, limit=1 << 20,
                                                              backlog=LISTEN_BACKLOG)
                    else:
                        srv = await asyncio.start_server(self._accept, sock=sock, limit=1 << 20,
                                                         backlog=LISTEN_BACKLOG)
                except BaseException:
                    sock.close()
                    raise
            else:  # vsock: not on this host
                raise QMPError(f"Socket address type '{kind}' is not supported")
        except OSError as e:
            raise QMPError(_listen_error(kind, data, e)) from None
        self._listeners.append(srv)

    def sockets(self) -> list[Any]:
        return [s.getsockname() for srv in self._listeners for s in srv.sockets]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from exportd.nbd.connection import Connection

        if self.max_connections and len(self.connections) >= self.max_connections:
            # QEMU stops accepting (clients wait in the backlog); we say no at once
            log.info("nbd: connection refused: max-connections=%d reached", self.max_connections)
            writer.transport.abort()
            return
        if not fdreserve.room_for_client():
            log.warning("nbd: connection refused: too few file descriptors left (the reserve is for QMP)")
            writer.transport.abort()
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    # --- exports ---------------------------------------------------------------
    def find_export(self, name: str) -> NbdExport | None:
        exp = self.exports.get(name)
        if exp is None or exp.shutting_down:
            return None
        return exp

    # --- stop ------------------------------------------------------------------
    async def close(self) -> None:
        """Stop listening and drop every client (the exports go first: see
        commands/nbd.py)."""
        for srv in self._listeners:
            srv.close()
        for conn in list(self.connections):
            conn.close()
        for srv in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 5)
        self._listeners.clear()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None


def _listen_error(kind: str, data: dict[str, Any], e: OSError) -> str:
    reason = e.strerror or str(e)
    if kind == "unix":
        return f"Failed to bind socket to {data.get('path')}: {reason}"
    if kind == "inet":
        return f"Failed to bind socket: {reason}"
    return f"Failed to use socket: {reason}"


# --- the daemon's server --------------------------------------------------------
def server_of(daemon: Any) -> NbdServer | None:
    return getattr(daemon, "nbd_server", None)


def tls_server_context(daemon: Any, creds_id: str) -> ssl.SSLContext:
    # the context's verify_mode is the credentials' verify-peer
    """The ssl context of the tls-creds-x509 object `creds_id` (QEMU's texts
    for a missing object or one made for clients: exportd.objects)."""
    from exportd.objects import tls_creds

    return tls_creds(daemon, creds_id, "server").server_context()


async def start_server(daemon: Any, args: dict[str, Any]) -> NbdServer:
    if server_of(daemon) is not None:
        raise QMPError("NBD server already running")
    tls = None
    tls_authz = None
    if args.get("tls-creds"):
        tls = tls_server_context(daemon, args["tls-creds"])
        # As QEMU, the id is not looked up here but at each client's handshake,
        # and only credentials that verify the peer (verify-peer, the default)
        # have a certificate to authorize: without it tls-authz is unused.
        if args.get("tls-authz") is not None and tls.verify_mode == ssl.CERT_REQUIRED:
            tls_authz = args["tls-authz"]
    # tls-authz without tls-creds is accepted and unused, as in qemu-storage-daemon 7.2
    server = NbdServer(
        daemon, tls=tls, tls_authz=tls_authz,
        max_connections=args.get("max-connections", DEFAULT_MAX_CONNECTIONS),
        handshake_max_seconds=args.get("handshake-max-seconds", DEFAULT_HANDSHAKE_MAX_SECONDS),
    )
    await server.listen(args["addr"])
    daemon.nbd_server = server
    return server


async def stop_server(daemon: Any) -> None:
    """nbd-server-stop: every NBD export goes (hard, as QEMU's
    blk_exp_close_all_type), then the listeners and the clients."""
    server = server_of(daemon)
    if server is None:
        raise QMPError("NBD server not running")
    daemon.nbd_server = None
    exports = [e for e in daemon.exports if e.type == "nbd"]
    for exp in exports:
        exp.request_shutdown(cancel_requests=True)
    await server.close()
    for exp in exports:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exp.wait_deleted(), 10)


async def shutdown_hook(daemon: Any) -> None:
    """At daemon shutdown (after the exports went): close what is left."""
    server = server_of(daemon)
    if server is not None:
        daemon.nbd_server = None
        await server.close()
