"""The /dev/fuse channel of one session: read requests, track them, answer them.

Reading: the fd is nonblocking and watched with loop.add_reader (and by the
loop's busy poller, busypoll.py, when polling is on). Each readiness callback
reads a burst of requests, one per read(2), into a buffer shared by every
session on the loop (buffers.py), and hands each to its opcode's handler:
`handlers`, a list indexed by opcode (opcodes.py), which INIT swaps from the
handshake table to the serving one.

Requests: a handler's coroutine starts at once (aio.resume.start_eagerly) and
is answered inline when it finishes without waiting (page-cache hits,
in-memory data); otherwise it goes on as a task, kept in the in-flight table
so that INTERRUPT can cancel it (it then answers EINTR) and a slow request
never stalls the others.

Replies: one writev per reply. A handler's OSError answers its errno, a
cancelled handler EINTR, anything else EIO (logged; the session keeps
serving). ENOENT from the device means the request was interrupted meanwhile;
ENODEV/ECONNABORTED that the connection is over (the owner is told).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from exportd.aio.resume import Resume, start_eagerly

from . import abi
from .buffers import BufferPool, pool_for
from .busypoll import poller_for, serve_readable
from .filesystem import SingleFileFS
from .replies import Scatter
from .requests import RequestError
from .splice import ReplyPipe
from .uring import FuseRing

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Room for fuse_in_header + fuse_write_in + max_write, rounded up to a page.
BUFFER_SIZE = MAX_WRITE + PAGE_SIZE
# Requests handled per readiness callback before yielding to other sessions.
BURST = 32

HEAD = struct.Struct("<IIQ")  # len, opcode, unique: the start of fuse_in_header
HEAD_UNIQUE = struct.Struct("<Q")  # fuse_out_header.unique, at offset 8
OUT = abi.OUT_HEADER

# A handler answers (or starts answering) one request: (channel, unique,
# buffer, body offset, end) -> True when the buffer must stay checked out
# (a request still points into it).
Handler = Callable[["Channel", int, memoryview, int, int], bool]
# A reply encoder: (handler result, request argument) -> payload (replies.py).
Encoder = Callable[[Any, Any], Any]


class Owner(Protocol):
    """What the channel and the handshake handlers need of their session."""

    mountpoint: str
    want_passthrough: bool
    want_io_uring: bool

    def initialized(self, minor: int, flags: int) -> None:
        """INIT was answered with protocol 7.`minor` and these flags."""

    def destroyed(self) -> None:
        """The kernel sent DESTROY (answered; reading stopped)."""

    def gone(self) -> None:
        """The device says the connection is over (unmounted or aborted)."""

    def halt(self, reason: str) -> None:
        """The device can no longer be trusted: unmount and end."""


def _overridden(fs: SingleFileFS, name: str) -> Any:
    """fs.<name> when its class overrides SingleFileFS's default, else None:
    looked up once per session, so a file system keeping the default costs
    no call per request."""
    if getattr(type(fs), name) is getattr(SingleFileFS, name):
        return None
    return getattr(fs, name)


class Channel:
    """One session's /dev/fuse fd on one loop; see the module docstring."""

    # one per live export: no per-instance dict
    __slots__ = (
        "fd", "fs", "owner", "handlers", "read_now", "write_now", "splice", "spliced",
        "reading", "counts", "other_counts", "ring", "_loop", "_pool", "_poller", "_inflight",
    )

    def __init__(
        self,
        fd: int,  # -1 until mounted: the session sets it, then start_reading()
        fs: SingleFileFS,
        owner: Owner,
        handlers: list[Handler | None],
        *,
        splice: ReplyPipe | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fd = fd
        self.fs = fs
        self.owner = owner
        self.handlers = handlers
        # the file system's synchronous shortcuts (None: it keeps the default)
        self.read_now = _overridden(fs, "read_now")
        self.write_now = _overridden(fs, "write_now")
        # the loop's reply pipe when READ replies may be spliced (readreply.py)
        self.splice = splice
        self.spliced = 0  # replies sent by splice (tests, benchmarks)
        self.reading = False  # the loop (and the poller) watch the fd
        self.counts = [0] * (abi.MAX_OPCODE + 1)
        self.other_counts: dict[int, int] = {}
        # FUSE over io_uring, once set up (uring.py): requests also come
        # through it, and replies to those go back through it
        self.ring: FuseRing | None = None
        self._loop = loop
        self._pool: BufferPool = pool_for(loop, BUFFER_SIZE)
        self._poller = poller_for(loop)
        # unique -> (task, resume, interruptible): see interrupt()
        self._inflight: dict[int, tuple[asyncio.Task[None], Resume, bool]] = {}

    # --- reading ------------------------------------------------------------------

    def start_reading(self) -> None:
        self._loop.add_reader(self.fd, self._on_readable)
        if self._poller is not None:
            self._poller.register(self.fd, self._drain)
        self.reading = True

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._loop.remove_reader(self.fd)
            if self._poller is not None:
                self._poller.unregister(self.fd)
            ring = self.ring
            if ring is not None and ring.fd >= 0:
                self._loop.remove_reader(ring.fd)
                if self._poller is not None:
                    self._poller.unregister(ring.fd)

    def use_ring(self, ring: FuseRing) -> None:
        """Serve the requests that come through `ring` too (registered)."""
        self.ring = ring
        self.splice = None  # ring replies are copied into the entry's payload
        if self.reading:
            if self._poller is not None:
                # /dev/fuse now only brings INTERRUPT and FORGET: not worth spinning on
                self._poller.unregister(self.fd)
            if ring.ring is None:
                return  # ring threads (ringthread.py) hand requests over themselves
            self._loop.add_reader(ring.fd, self._on_ring_readable)
            if self._poller is not None:
                self._poller.register(ring.fd, self._drain_ring, ring.ring.has_completions)
            self._loop.call_soon(self._drain_ring)  # what came while registering

    def close(self) -> None:
        """Stop reading, cancel what is in flight, close the ring and the fd."""
        self.stop_reading()
        fd, self.fd = self.fd, -1
        for task, resume, _ in list(self._inflight.values()):
            _cancel(task, resume)
        self._inflight.clear()
        if self.ring is not None:
            self.ring.close()  # first: its pending commands hold the device file
        if fd >= 0:
            os.close(fd)

    def _on_ring_readable(self) -> None:
        serve_readable(self._poller, self._drain_ring)

    def _drain_ring(self) -> bool:
        ring = self.ring
        if ring is None or not self.reading:
            return True
        return ring.drain()

    def _on_readable(self) -> None:
        serve_readable(self._poller, self._drain)

    def _drain(self) -> bool:
        """Read and dispatch up to BURST requests. True when nothing of ours
        is in flight afterwards (see busypoll.py)."""
        pool = self._pool
        buf = pool.acquire()
        try:
            for _ in range(BURST):
                if not self.reading:
                    return True
                try:
                    n = os.readv(self.fd, (buf,))
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # the request was interrupted before we got it
                    if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                        self.owner.gone()
                    else:
                        self.owner.halt(f"read from /dev/fuse failed: {e}")
                    return True
                if self._dispatch(buf, n):
                    buf = pool.acquire()  # the old one belongs to a pending WRITE now
        finally:
            pool.release(buf)
        return not self._inflight

    def _dispatch(self, buf: memoryview, n: int) -> bool:
        """Handle one request read from /dev/fuse; True when `buf` must stay
        checked out."""
        if n < 40:
            self.owner.halt(f"short read of {n} bytes (header is 40)")
            return False
        length, opcode, unique = HEAD.unpack_from(buf)
        if length != n:
            self.owner.halt(f"header length {length} != {n} bytes read (opcode {opcode})")
            return False
        return self.dispatch(opcode, unique, buf, 40, n)

    def dispatch(self, opcode: int, unique: int, buf: memoryview, off: int, end: int) -> bool:
        """Hand one request (its body is buf[off:end]) to its opcode's
        handler; True when `buf` must stay checked out."""
        if opcode <= abi.MAX_OPCODE:
            self.counts[opcode] += 1
            handler = self.handlers[opcode]
        else:
            self.other_counts[opcode] = self.other_counts.get(opcode, 0) + 1
            handler = None
        if handler is None:
            self.reply_error(unique, errno.ENOSYS)
            return False
        try:
            return handler(self, unique, buf, off, end)
        except RequestError as e:
            log.warning("%s: bad request: %s", self.owner.mountpoint, e)
            self.reply_error(unique, errno.EINVAL)
            return False
        except Exception:
            # A bug here must not leave the caller waiting for an answer.
            log.exception(
                "%s: %s request failed", self.owner.mountpoint, abi.opcode_name(opcode)
            )
            self.reply_error(unique, errno.EIO)
            return False

    # --- requests in flight -------------------------------------------------------

    def start(
        self,
        unique: int,
        coro: Coroutine[Any, Any, Any],
        encode: Encoder | None,
        arg: Any,
        buf: memoryview | None,
        interruptible: bool,
    ) -> bool:
        """Start a handler coroutine; answer inline if it finishes at once.

        The reply payload is encode(result, arg) (encode None: the result
        itself). When the handler waits it goes on as a task (go_on); `buf`
        then stays checked out until it is done (the return value says so).
        """
        try:
            result = start_eagerly(coro)
        except BaseException as exc:  # noqa: B036 - every failure becomes an errno
            self.reply_exception(unique, exc)
            return False
        if type(result) is Resume:
            self.go_on(unique, result, encode, arg, buf, interruptible)
            return buf is not None
        try:
            payload = result if encode is None else encode(result, arg)
        except Exception as exc:
            self.reply_exception(unique, exc)
            return False
        self.reply_ok(unique, payload)
        return False

    def go_on(
        self,
        unique: int,
        resume: Resume,
        encode: Encoder | None,
        arg: Any,
        buf: memoryview | None,
        interruptible: bool,
    ) -> None:
        """Continue a handler that waits in a task of its own (see start)."""
        task = self._loop.create_task(self._finish(unique, resume, encode, arg, buf))
        self._inflight[unique] = (task, resume, interruptible)

    async def _finish(
        self,
        unique: int,
        work: Awaitable[Any],
        encode: Encoder | None,
        arg: Any,
        buf: memoryview | None,
    ) -> None:
        reuse = True
        try:
            result = await work
            payload = result if encode is None else encode(result, arg)
        except BaseException as exc:  # noqa: B036
            # A cancelled handler may have left work behind (a thread still
            # copying from `buf`): never hand that buffer to another request.
            reuse = not isinstance(exc, asyncio.CancelledError)
            if self.fd >= 0:
                self.reply_exception(unique, exc)
        else:
            if self.fd >= 0:
                self.reply_ok(unique, payload)
        finally:
            self._inflight.pop(unique, None)
            if buf is not None and (self.ring is None or buf.obj is not self.ring.memory):
                if reuse:
                    self._pool.release(buf)
                else:
                    self._pool.discard(buf)
            if not self._inflight and self.reading and self._poller is not None:
                self._poller.idle()

    def interrupt(self, target: int) -> None:
        """INTERRUPT of request `target`. Only requests that change nothing
        are cancelled: an interrupted WRITE (or fallocate, fsync, setattr...)
        whose I/O already went to a worker thread would be answered EINTR
        while it still lands later, possibly over a newer write. Those
        finish and answer normally. An unknown target was already answered
        (requests are read in order)."""
        entry = self._inflight.get(target)
        if entry is not None and entry[2]:
            _cancel(entry[0], entry[1])

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # --- replies ------------------------------------------------------------------

    def write(self, parts: tuple[Any, ...]) -> None:
        """Send one reply: parts[0] is its fuse_out_header."""
        if self.fd < 0:
            return
        ring = self.ring
        if ring is not None and ring.commit(HEAD_UNIQUE.unpack_from(parts[0], 8)[0], parts):
            return
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            self.write_failed(e)

    def write_failed(self, e: OSError) -> None:
        if e.errno == errno.ENOENT:
            return  # request was interrupted/aborted meanwhile
        if e.errno in (errno.ENODEV, errno.ECONNABORTED):
            self.owner.gone()
            return
        log.error("%s: reply rejected by the kernel: %s", self.owner.mountpoint, e)

    def reply_ok(self, unique: int, payload: Any) -> None:
        if payload is None:
            self.write((OUT.pack(16, 0, unique),))
        elif type(payload) is Scatter:
            self.write((OUT.pack(16 + payload.length, 0, unique), *payload.parts))
        else:
            self.write((OUT.pack(16 + len(payload), 0, unique), payload))

    def reply_error(self, unique: int, err: int) -> None:
        self.write((OUT.pack(16, -err, unique),))

    def reply_exception(self, unique: int, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            err = errno.EINTR
        elif isinstance(exc, OSError) and exc.errno and 0 < exc.errno < 4096:
            err = exc.errno
        else:
            log.error("%s: request handler failed", self.owner.mountpoint, exc_info=exc)
            err = errno.EIO
        self.reply_error(unique, err)
        if not isinstance(exc, Exception | asyncio.CancelledError):
            raise exc  # KeyboardInterrupt, SystemExit


def _cancel(task: asyncio.Task[None], resume: Resume) -> None:
    """Cancel a request's handler so that it still answers (EINTR) and cleans up."""
    if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:
        resume.cancel_first = True
    else:
        task.cancel()
