"""File descriptors passed to the monitor (SCM_RIGHTS), and their names.

A QMP client sends a descriptor in the ancillary data of the bytes it
writes (qemu.qmp's `send_fd_scm`), then names it with `getfd`; a command
that takes a SocketAddress of type `fd` (nbd-server-start, the nbd driver)
then takes the named descriptor out of the monitor, as QEMU's
monitor_get_fd() does. Outside a monitor (the command line) an fd "name"
is a number the daemon inherited.

Names belong to the monitor socket, not to one connection (QEMU keeps them
on the Monitor), so a client may name a descriptor and disconnect and the
next client can use it. Descriptors that came with a message but were
never taken are closed when the connection ends.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import stat
from collections import deque
from contextvars import ContextVar
from typing import Any

from exportd.errors import QMPError

# QEMU's char-socket takes at most this many descriptors per message
MAX_FDS_PER_MESSAGE = 16
# messages with descriptors waiting for a getfd, per connection; older ones
# are closed past this
MAX_WAITING_MESSAGES = 16
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class NamedFds:
    """The descriptors one monitor holds by name (getfd / closefd)."""

    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}

    def put(self, name: str, fd: int) -> None:
        """Name `fd`; a descriptor already under that name is closed (QEMU)."""
        old = self.by_name.get(name)
        self.by_name[name] = fd
        if old is not None:
            _close_all([old])

    def take(self, name: str) -> int:
        """Hand the descriptor over to the caller, who now owns it."""
        fd = self.by_name.pop(name, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{name}' has not been found")
        return fd

    def close(self, name: str) -> None:
        fd = self.by_name.pop(name, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{name}' not found")
        _close_all([fd])

    def close_all(self) -> None:
        fds = list(self.by_name.values())
        self.by_name.clear()
        _close_all(fds)


class MonitorFds:
    """What one QMP connection's commands see: the descriptors that came with
    its messages and no getfd took yet, oldest first, and its monitor's names.

    QEMU reads its monitor a byte at a time, so each getfd takes the
    descriptors sent with the bytes before it. A recvmsg here returns the
    bytes of several sends at once (the kernel ends a read after the part
    that carries descriptors), so a client that sends fd, getfd, fd, getfd
    without waiting would see its second descriptor arrive with its first
    getfd: a queue keeps them in order."""

    def __init__(self, named: NamedFds) -> None:
        self.named = named
        self.received: deque[list[int]] = deque()

    def arrived(self, fds: list[int]) -> None:
        self.received.append(fds)
        while len(self.received) > MAX_WAITING_MESSAGES:
            _close_all(self.received.popleft())

    def take_received(self) -> int | None:
        """The first descriptor of the oldest waiting message (the others
        that came with it are closed, as QEMU does)."""
        if not self.received:
            return None
        fds = self.received.popleft()
        _close_all(fds[1:])
        return fds[0]

    def close(self) -> None:
        while self.received:
            _close_all(self.received.popleft())


# The descriptors of the monitor connection whose command runs in this task
# (set by Session.dispatch; None on the command line).
current_monitor_fds: ContextVar[MonitorFds | None] = ContextVar("current_monitor_fds", default=None)


def socket_fd(name: str) -> int:
    """QEMU's socket_get_fd(): the descriptor of a SocketAddress `fd`, which
    the caller then owns. In a monitor command `name` is a getfd name; on
    the command line it is the number of an inherited descriptor."""
    fds = current_monitor_fds.get()
    if fds is not None:
        fd = fds.named.take(name)
    else:
        try:
            fd = int(name, 10)
        except ValueError:
            raise QMPError(f"Unable to parse FD number {name}: Invalid argument") from None
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        if fds is not None:  # ours now: do not leak it
            _close_all([fd])
        raise QMPError(f"File descriptor '{name}' is not a socket")
    return fd


class FdReceivingReader:
    """The input side of a monitor connection read with recvmsg, so that
    descriptors sent with SCM_RIGHTS are kept (asyncio's transports drop
    ancillary data). The transport keeps the output side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fds: MonitorFds) -> None:
        self.fds = fds
        transport = writer.transport
        transport.pause_reading()  # the transport's own reader would eat our input
        # whatever the stream took before the pause comes first
        self._leftover = bytes(reader._buffer)  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        self._eof = reader.at_eof()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._sock: socket.socket | None = None
        sock = transport.get_extra_info("socket")
        fileno = sock.fileno() if sock is not None else -1
        if transport.is_closing() or fileno < 0:
            self._eof = True  # the client went before its session started
            return
        # a duplicate: closing it never closes the transport's socket
        self._sock = socket.socket(fileno=os.dup(fileno))
        self._sock.setblocking(False)

    async def read(self, n: int) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return data
        loop = asyncio.get_running_loop()
        while not (self._closed or self._eof) and self._sock is not None:
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(n, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._readable(loop)
                continue
            self._keep_fds(ancillary)
            if not data:
                self._eof = True
            return data
        return b""

    async def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        waiter = self._waiter = loop.create_future()
        fileno = self._sock.fileno()
        loop.add_reader(fileno, _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(fileno)
            self._waiter = None

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
                fds.extend(arr)
        if fds:
            self.fds.arrived(fds)

    def close(self) -> None:
        """End reading: a read waiting now returns b"" (the session ends)."""
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            _wake(self._waiter)

    def release(self) -> None:
        """Close the duplicate socket once no read waits on it."""
        self._closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def _wake(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
