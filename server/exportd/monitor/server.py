"""A QMP monitor: a listening UNIX socket whose clients each get a Session.

Every session runs its commands through the one CommandExecutor the monitor
was given; its owner passes events in through broadcast().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

from exportd.monitor.fdpass import FdReceivingReader, MonitorFds, NamedFds
from exportd.monitor.session import Session

if TYPE_CHECKING:
    from exportd.monitor.executor import CommandExecutor

log = logging.getLogger(__name__)

# Room for a burst of hundreds of clients connecting at once (the kernel
# caps it at net.core.somaxconn); asyncio accepts up to this many per wakeup.
LISTEN_BACKLOG = 4096


class MonitorError(Exception):
    pass


def adopt_listening_socket(fd: int) -> socket.socket:
    """A listening UNIX stream socket passed in as `fd` (socket activation,
    `--chardev socket,fd=N`)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise MonitorError(f"file descriptor {fd} is not a socket: {e.strerror}") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise MonitorError(f"file descriptor {fd} is not a listening UNIX stream socket")
    sock.setblocking(False)
    return sock


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A listening socket at `path`, with `mode` (0600 unless the operator
    chose another: --socket-mode).

    A leftover socket file from a dead daemon is replaced; one that a live
    process still answers on is not taken over.
    """
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the NUL
        raise MonitorError(f"Failed to bind socket to {path}: AF_UNIX path too long")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise MonitorError(f"Failed to bind socket to {path}: File exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise MonitorError(f"Failed to bind socket to {path}: another daemon is listening there")
        finally:
            probe.close()
    # Bind under a temporary name and rename it into place once listening:
    # whoever sees the socket file can connect at once.
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".exportd-{os.getpid()}.sock")
    if len(os.fsencode(tmp)) > 107:
        tmp = path  # no room for the temporary name: bind in place
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        if tmp != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(LISTEN_BACKLOG)
        if mode != 0o600:
            os.chmod(tmp, mode)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        reason = e.strerror or str(e)  # "AF_UNIX path too long" has no errno
        raise MonitorError(f"Failed to bind socket to {path}: {reason}") from e
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


class Monitor:
    def __init__(self, executor: CommandExecutor, path: str, *, pretty: bool = False, name: str = "") -> None:
        self.executor = executor
        self.path = path
        self.pretty = pretty
        self.name = name
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self.named_fds = NamedFds()  # getfd names live as long as the monitor (as QEMU's)

    async def start(self, fd: int | None = None, mode: int = 0o600) -> None:
        """Listen on `path` (created with `mode`), or on the listening socket
        `fd` a service manager passed (whose file is not ours to remove)."""
        if fd is not None:
            sock = adopt_listening_socket(fd)
        else:
            sock = bind_unix_socket(self.path, mode)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._client, sock=sock, backlog=LISTEN_BACKLOG)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fds_reader = FdReceivingReader(reader, writer, MonitorFds(self.named_fds))
        session = Session(self.executor, fds_reader, writer, pretty=self.pretty)
        self.sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)

    def broadcast(self, message: dict[str, Any]) -> None:
        for session in list(self.sessions):
            session.send_event(message)

    async def close(self) -> None:
        """Stop listening, flush and close every client, remove the socket file."""
        if self._server is not None:
            self._server.close()
        self._remove_socket_file()
        writers = []
        for session in list(self.sessions):
            session.close()
            writers.append(session.writer)
        for w in writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 2.0)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.named_fds.close_all()

    def _remove_socket_file(self) -> None:
        # only our own socket: another daemon may have replaced it since
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
