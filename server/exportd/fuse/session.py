"""One FUSE session: a mounted single-file filesystem served on the asyncio loop.

    session = await FuseSession.start(fs, mountpoint, fsname="exportd:x",
                                      read_only=False, allow_other=False,
                                      passthrough=False)
    reason = await session.closed        # or: await session.close()

The /dev/fuse fd is nonblocking and watched with loop.add_reader. Each
readiness callback reads a burst of requests (one per read(2)) into a buffer
shared by all sessions on the loop (see buffers.py) and dispatches each one:
its handler coroutine is started at once and, when it finishes without
suspending (page-cache hits, in-memory data), answered inline; otherwise it
continues as its own task, so a slow request never stalls the others.
INTERRUPT cancels the task, which answers EINTR. Every reply is one writev.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import inspect
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import abi, replies, requests
from .buffers import BufferPool, pool_for
from .busypoll import poller_for
from .filesystem import SingleFileFS
from .mount import (
    MountError,
    MountOptions,
    find_mount,
    mount_fusermount,
    mount_root,
    open_dev_fuse,
    top_connection,
    unmount_if_ours,
)
from .resume import Resume as _Resume
from .splice import SPLICE_MAX_READ, SPLICE_MIN, ReplyPipe, pipe_for
from .threads import blocking_call

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Room for fuse_in_header + fuse_write_in + max_write, rounded up to a page.
BUFFER_SIZE = MAX_WRITE + PAGE_SIZE
# Requests handled per readiness callback before yielding to other sessions.
BURST = 32
# WRITE payloads up to this size are copied out of the shared buffer so the
# buffer never waits on a slow handler; bigger ones keep it checked out.
COPY_WRITE_MAX = 128 * 1024
WANTED_FLAGS = (
    abi.ASYNC_READ
    | abi.ATOMIC_O_TRUNC
    | abi.BIG_WRITES
    | abi.ASYNC_DIO
    | abi.AUTO_INVAL_DATA
    | abi.MAX_PAGES
    | abi.INIT_EXT
    | abi.ABORT_ERROR
    | abi.DIRECT_IO_ALLOW_MMAP
    # We clear set-id bits ourselves when the kernel says so (fs.kill_setid),
    # so it can skip its own check on every write: a getxattr of
    # security.capability per passthrough write (bench/README.md, Levers).
    | abi.HANDLE_KILLPRIV_V2
)


class PassthroughUnavailable(OSError):
    """The kernel or our privileges refuse FUSE passthrough; serve reads ourselves."""


def _cancel_request(task: asyncio.Task[None], resume: _Resume) -> None:
    """Cancel a request's handler so that it still answers (EINTR) and cleans up."""
    if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:
        resume.cancel_first = True
    else:
        task.cancel()


class FuseSession:
    """A mounted single-file FUSE filesystem served on one asyncio loop."""

    def __init__(
        self,
        fs: SingleFileFS,
        mountpoint: str,
        options: MountOptions,
        *,
        passthrough: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.fsname = options.fsname
        self.want_passthrough = passthrough
        self.passthrough_available = False
        self.connection: int | None = None  # FUSE connection number (fusectl)
        self.proto_minor = 0
        self.max_write = MAX_WRITE
        self._loop = loop
        self._pool: BufferPool = pool_for(loop, BUFFER_SIZE)
        self._poller = poller_for(loop)
        self._fd = -1
        self._reading = False
        # synchronous read/write of file systems that offer them (see _dispatch)
        self._read_now = getattr(fs, "read_now", None)
        self._write_now = getattr(fs, "write_now", None)
        # READ replies spliced from the image file (splice.py), when mounted for it
        self._splice: ReplyPipe | None = None
        if fs.splice_reads and options.max_read <= SPLICE_MAX_READ:
            self._splice = pipe_for(loop)
        self.spliced = 0  # replies sent by splice (tests, benchmarks)
        # unique -> (task, resume, interruptible): see _op_interrupt
        self._inflight: dict[int, tuple[asyncio.Task[None], _Resume, bool]] = {}
        self._backing_ids: set[int] = set()
        self._counts = [0] * (abi.MAX_OPCODE + 1)
        self._other_counts: dict[int, int] = {}
        self._init_done: asyncio.Future[None] = loop.create_future()
        self._ready = False  # INIT answered
        self.closed: asyncio.Future[str] = loop.create_future()
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None  # referenced until done

    # --- life cycle ---------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        fs: SingleFileFS,
        mountpoint: str,
        *,
        fsname: str,
        read_only: bool = False,
        allow_other: bool = False,
        passthrough: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        init_timeout: float = 10.0,
    ) -> FuseSession:
        """Mount `fs` over the regular file `mountpoint` and serve it.

        Returns once the kernel's INIT is answered. Raises MountError (an
        OSError) with the kernel's or fusermount3's message when mounting
        fails, TimeoutError when INIT never comes.
        """
        loop = loop or asyncio.get_running_loop()
        splice_reads = bool(getattr(fs, "splice_reads", False)) and pipe_for(loop).usable
        options = MountOptions(
            fsname=fsname,
            read_only=read_only,
            allow_other=allow_other,
            # a spliced reply must fit the pipe, header included
            max_read=SPLICE_MAX_READ if splice_reads else MAX_WRITE,
        )
        self = cls(fs, mountpoint, options, passthrough=passthrough, loop=loop)
        await self._mount()
        try:
            await asyncio.wait_for(asyncio.shield(self._init_done), init_timeout)
        except BaseException:
            await self.close()
            raise
        return self

    async def _mount(self) -> None:
        # One worker thread resolves the path (mountinfo lists the resolved
        # one, and after the mount a lookup of it would be served by this
        # loop), mounts, and finds the new connection (statx; mountinfo as a
        # fallback), while the loop is free to answer INIT. One thread hop
        # per mount instead of three steps (add+del cycle: bench/README.md).
        path = self.mountpoint
        if os.geteuid() == 0:
            # The fd only becomes readable once mount(2) attached it to a
            # connection (before that, read gives EPERM); INIT waits queued.
            fd = open_dev_fuse()
            try:
                resolved, _, connection = await self._in_mount_thread(
                    _resolve_and_mount, path, self.fsname, mount_root, fd, self.options
                )
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        else:
            resolved, self._fd, connection = await self._in_mount_thread(
                _resolve_and_mount, path, self.fsname, mount_fusermount, None, self.options
            )
        self.mountpoint = resolved
        self._start_reading()
        self.connection = connection

    async def _in_mount_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a mount call in a thread. If we are cancelled meanwhile, the
        thread still finishes: undo its mount so nothing stale stays behind."""
        work = asyncio.ensure_future(blocking_call(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            try:
                resolved, fd, _ = await work
            except Exception:
                raise asyncio.CancelledError from None
            if fd is not None:
                os.close(fd)  # the fd fusermount3 handed over
            await blocking_call(unmount_if_ours, resolved, None, lazy=True)
            raise

    async def close(self) -> None:
        """Unmount and stop serving. Idempotent; safe from any task."""
        if self.closed.done():
            return
        if self._close_task is None:
            self._close_task = self._loop.create_task(self._shutdown("closed"))
        await asyncio.shield(self._close_task)

    async def _shutdown(self, reason: str) -> None:
        self._closing = True
        try:
            await blocking_call(unmount_if_ours, self.mountpoint, self.connection)
        except OSError as e:
            log.warning("%s: unmount failed: %s", self.mountpoint, e)
        self._end(reason)

    def _end(self, reason: str) -> None:
        """Release everything; tell the owner. Runs once."""
        if self.closed.done():
            return
        self._stop_reading()
        if not self._init_done.done():
            self._init_done.set_exception(
                MountError(errno.EIO, f"session ended before INIT: {reason}")
            )
            self._init_done.exception()  # mark retrieved
        fd, self._fd = self._fd, -1
        for backing_id in list(self._backing_ids):
            self._backing_close_fd(fd, backing_id)
        self._backing_ids.clear()
        for task, resume, _ in list(self._inflight.values()):
            _cancel_request(task, resume)
        self._inflight.clear()
        if fd >= 0:
            os.close(fd)
        self.closed.set_result(reason)
        log.info("%s: FUSE session ended (%s)", self.mountpoint, reason)
        try:
            self.fs.on_session_end(reason)
        except Exception:
            log.exception("%s: on_session_end failed", self.mountpoint)

    def _halt(self, reason: str) -> None:
        """Stop trusting the device; unmount and end in the background."""
        log.error("%s: halting FUSE session: %s", self.mountpoint, reason)
        self._stop_reading()
        if self._close_task is None and not self.closed.done():
            self._close_task = self._loop.create_task(self._shutdown("error: " + reason))

    def _gone(self) -> None:
        """The device says the connection is over (unmounted or aborted)."""
        reason = "closed" if self._closing else "unmounted"
        self._stop_reading()
        if self._closing:
            return  # _shutdown finishes the job
        self._end(reason)
        # An aborted connection may leave its mount behind (ENOTCONN); drop it.
        self._cleanup_task = self._loop.create_task(self._drop_dead_mount())

    async def _drop_dead_mount(self) -> None:
        try:
            await blocking_call(unmount_if_ours, self.mountpoint, self.connection, lazy=True)
        except Exception as e:  # best effort
            log.debug("%s: no dead mount to drop: %s", self.mountpoint, e)

    # --- introspection -----------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Requests seen per opcode name (only nonzero ones)."""
        out = {abi.opcode_name(op): n for op, n in enumerate(self._counts) if n}
        out.update({abi.opcode_name(op): n for op, n in self._other_counts.items()})
        return out

    def count(self, opcode_name: str) -> int:
        return self.counters.get(opcode_name, 0)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # --- passthrough ------------------------------------------------------------

    def open_backing(self, fd: int) -> int:
        """Register `fd` as a passthrough backing file; returns the backing id.

        Raises PassthroughUnavailable when passthrough was not negotiated or
        the kernel refuses (e.g. EPERM without CAP_SYS_ADMIN).
        """
        if not self.passthrough_available or self._fd < 0:
            raise PassthroughUnavailable(
                errno.EOPNOTSUPP, "FUSE passthrough not negotiated with the kernel"
            )
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(self._fd, abi.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as e:
            raise PassthroughUnavailable(
                e.errno, f"FUSE_DEV_IOC_BACKING_OPEN refused: {e.strerror}"
            ) from None
        self._backing_ids.add(backing_id)
        return backing_id

    def close_backing(self, backing_id: int) -> None:
        if backing_id in self._backing_ids:
            self._backing_ids.discard(backing_id)
            self._backing_close_fd(self._fd, backing_id)

    @staticmethod
    def _backing_close_fd(fd: int, backing_id: int) -> None:
        if fd < 0:
            return
        try:
            fcntl.ioctl(
                fd, abi.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")), True
            )
        except OSError as e:
            log.debug("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", backing_id, e)

    # --- reading and dispatch ------------------------------------------------------

    def _start_reading(self) -> None:
        self._loop.add_reader(self._fd, self._on_readable)
        if self._poller is not None:
            self._poller.register(self._fd, self._drain)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            if self._poller is not None:
                self._poller.unregister(self._fd)

    def _on_readable(self) -> None:
        poller = self._poller
        if poller is None:
            self._drain()
            return
        poller.woken()
        if self._drain():
            poller.idle()

    def _drain(self) -> bool:
        """Read and dispatch up to BURST requests. True when nothing of ours
        is in flight afterwards (see busypoll.py)."""
        pool = self._pool
        buf = pool.acquire()
        try:
            for _ in range(BURST):
                if not self._reading:
                    return True
                try:
                    n = os.readv(self._fd, (buf,))
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # the request was interrupted before we got it
                    if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                        self._gone()
                    else:
                        self._halt(f"read from /dev/fuse failed: {e}")
                    return True
                if self._dispatch(buf, n):
                    buf = pool.acquire()  # the old one belongs to a pending WRITE now
        finally:
            pool.release(buf)
        return not self._inflight

    def _dispatch(self, buf: memoryview, n: int) -> bool:
        """Handle one request; True when `buf` must stay checked out."""
        if n < 40:
            self._halt(f"short read of {n} bytes (header is 40)")
            return False
        length, opcode, unique = _HEAD.unpack_from(buf)
        if length != n:
            self._halt(f"header length {length} != {n} bytes read (opcode {opcode})")
            return False
        if opcode <= abi.MAX_OPCODE:
            self._counts[opcode] += 1
        else:
            self._other_counts[opcode] = self._other_counts.get(opcode, 0) + 1
        if opcode == _READ and n >= 80 and self._ready:
            # The hot path, inlined (same steps as _op_read, _run, _reply_ok):
            # a read that completes without suspending is answered here.
            fh, offset, size = _READ_HEAD.unpack_from(buf, 40)
            data = None
            if self._read_now is not None:
                # no coroutine at all when the file system can answer at once
                try:
                    data = self._read_now(fh, offset, size)
                except BaseException as exc:  # noqa: B036 - every failure becomes an errno
                    self._reply_exception(unique, exc)
                    return False
                if type(data) is list:
                    if size >= SPLICE_MIN and self._splice is not None and self._splice_read(data, unique):
                        return False
                    data = _extents_data(data)
            if data is None:
                coro = self.fs.read(fh, offset, size)
                try:
                    pending = coro.send(None)
                except StopIteration as stop:
                    data = stop.value
                except BaseException as exc:  # noqa: B036 - every failure becomes an errno
                    self._reply_exception(unique, exc)
                    return False
                else:
                    resume = _Resume(coro, pending)
                    task = self._loop.create_task(
                        self._finish(unique, resume, _encode_read, size, None)
                    )
                    self._inflight[unique] = (task, resume, True)
                    return False
            if type(data) is list:
                self._reply_ok(unique, _ScatterReply(data, size))
                return False
            if len(data) > size:
                data = memoryview(data)[:size]
            if self._fd >= 0:
                try:
                    os.writev(self._fd, (_OUT.pack(16 + len(data), 0, unique), data))
                except OSError as e:
                    self._write_failed(e)
            return False
        op = _OPS.get(opcode)
        if op is None:
            self._reply_error(unique, errno.ENOSYS)
            return False
        if not self._ready and opcode != abi.INIT:
            log.warning("%s: %s before INIT", self.mountpoint, abi.opcode_name(opcode))
            self._reply_error(unique, errno.EIO)
            return False
        try:
            return op(self, unique, buf, 40, n)
        except requests.RequestError as e:
            log.warning("%s: bad request: %s", self.mountpoint, e)
            self._reply_error(unique, errno.EINVAL)
            return False
        except Exception:
            # A bug here must not leave the caller waiting for an answer.
            log.exception("%s: %s request failed", self.mountpoint, abi.opcode_name(opcode))
            self._reply_error(unique, errno.EIO)
            return False

    def _splice_read(self, extents: list[Any], unique: int) -> bool:
        """Answer a READ by splicing from the image file; False when the
        extents cannot be spliced (nothing was sent)."""
        if self._fd < 0:
            return False  # the normal path drops the reply
        total = 0
        for fd, _, n, never_blocks in extents:
            if fd < 0 or not never_blocks:
                return False
            total += n
        pipe = self._splice
        if not pipe.fill(_OUT.pack(16 + total, 0, unique), [e[:3] for e in extents], total):
            return False
        try:
            pipe.send(self._fd, 16 + total)
        except OSError as e:
            self._write_failed(e)
            return True
        self.spliced += 1
        return True

    def _run(
        self,
        unique: int,
        coro: Coroutine[Any, Any, Any],
        encode: Callable[[Any, int], Any] | None = None,
        arg: int = 0,
        buf: memoryview | None = None,
        *,
        interruptible: bool = False,
    ) -> bool:
        """Start a handler coroutine; answer inline if it finishes at once.

        `encode(result, arg)` turns the handler's result into the reply
        payload (None: an empty reply). When the handler suspends it goes on
        as a task; `buf` then stays checked out until it is done.
        """
        try:
            pending = coro.send(None)
        except StopIteration as stop:
            try:
                payload = stop.value if encode is None else encode(stop.value, arg)
            except Exception as exc:
                self._reply_exception(unique, exc)
                return False
            self._reply_ok(unique, payload)
            return False
        except BaseException as exc:  # noqa: B036 - every failure becomes an errno
            self._reply_exception(unique, exc)
            return False
        resume = _Resume(coro, pending)
        task = self._loop.create_task(self._finish(unique, resume, encode, arg, buf))
        self._inflight[unique] = (task, resume, interruptible)
        return buf is not None

    async def _finish(
        self,
        unique: int,
        work: Awaitable[Any],
        encode: Callable[[Any, int], Any] | None,
        arg: int,
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
            if self._fd >= 0:
                self._reply_exception(unique, exc)
        else:
            if self._fd >= 0:
                self._reply_ok(unique, payload)
        finally:
            self._inflight.pop(unique, None)
            if buf is not None:
                if reuse:
                    self._pool.release(buf)
                else:
                    self._pool.discard(buf)
            if not self._inflight and self._reading and self._poller is not None:
                self._poller.idle()

    # --- replies -----------------------------------------------------------------

    def _write(self, parts: tuple[Any, ...]) -> None:
        if self._fd < 0:
            return
        try:
            os.writev(self._fd, parts)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        if e.errno == errno.ENOENT:
            return  # request was interrupted/aborted meanwhile
        if e.errno in (errno.ENODEV, errno.ECONNABORTED):
            self._gone()
            return
        log.error("%s: reply rejected by the kernel: %s", self.mountpoint, e)

    def _reply_ok(self, unique: int, payload: Any) -> None:
        if payload is None:
            self._write((_OUT.pack(16, 0, unique),))
        elif type(payload) is _ScatterReply:
            self._write((_OUT.pack(16 + payload.length, 0, unique), *payload.parts))
        else:
            self._write((_OUT.pack(16 + len(payload), 0, unique), payload))

    def _reply_error(self, unique: int, err: int) -> None:
        self._write((_OUT.pack(16, -err, unique),))

    def _reply_exception(self, unique: int, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            err = errno.EINTR
        elif isinstance(exc, OSError) and exc.errno and 0 < exc.errno < 4096:
            err = exc.errno
        else:
            log.error("%s: request handler failed", self.mountpoint, exc_info=exc)
            err = errno.EIO
        self._reply_error(unique, err)
        if not isinstance(exc, Exception | asyncio.CancelledError):
            raise exc  # KeyboardInterrupt, SystemExit

    # --- INIT / DESTROY / INTERRUPT / FORGET ------------------------------------

    def _op_init(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        init = requests.init_in(buf, off, end)
        if init.major > abi.KERNEL_VERSION:
            # Tell the kernel our major; it retries INIT with it.
            self._write(
                (
                    abi.OUT_HEADER.pack(16 + 8, 0, unique),
                    abi.INIT_OUT.pack(
                        abi.KERNEL_VERSION,
                        abi.KERNEL_MINOR_VERSION,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                    )[:8],
                )
            )
            return False
        if init.major < abi.KERNEL_VERSION or init.minor < abi.MIN_KERNEL_MINOR:
            self._reply_error(unique, errno.EPROTO)
            self._halt(f"kernel FUSE protocol {init.major}.{init.minor} is too old")
            return False
        minor = min(init.minor, abi.KERNEL_MINOR_VERSION)
        flags = WANTED_FLAGS
        max_stack_depth = 0
        if self.want_passthrough:
            flags |= abi.PASSTHROUGH
            # 2 = FILESYSTEM_MAX_STACK_DEPTH: backing files may sit on overlayfs
            # (container roots); nothing stacks on a single-file mount anyway.
            max_stack_depth = 2
        flags &= init.flags
        if not flags & abi.INIT_EXT:
            flags &= 0xFFFFFFFF
        self.passthrough_available = bool(flags & abi.PASSTHROUGH)
        if not self.passthrough_available:
            max_stack_depth = 0
        self.proto_minor = minor
        payload = replies.init_out(
            minor=minor,
            max_readahead=init.max_readahead,
            flags=flags,
            max_background=64,
            congestion_threshold=48,
            max_write=self.max_write,
            max_pages=self.max_write // PAGE_SIZE,
            max_stack_depth=max_stack_depth,
        )
        self._reply_ok(unique, payload)
        log.debug("%s: INIT 7.%d flags %#x", self.mountpoint, minor, flags)
        self._ready = True
        if not self._init_done.done():
            self._init_done.set_result(None)
        return False

    def _op_destroy(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        self._reply_ok(unique, None)
        self._stop_reading()
        if not self._closing:
            self._end("destroy")
        return False

    def _op_interrupt(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        (target,) = requests.body(abi.INTERRUPT_IN, buf, off, end, "INTERRUPT")
        # Only requests that change nothing are cancelled: an interrupted
        # WRITE (or fallocate, fsync, setattr...) whose I/O already went to a
        # worker thread would be answered EINTR while it still lands later,
        # possibly over a newer write. Those finish and answer normally.
        entry = self._inflight.get(target)
        if entry is not None and entry[2]:
            _cancel_request(entry[0], entry[1])
        # Unknown: already answered (we read requests in order). No reply either way.
        return False

    def _op_forget(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        return False  # one inode that never goes away; FORGET gets no reply

    def _op_lookup(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        self._reply_error(unique, errno.ENOENT)  # the root is a file: nothing under it
        return False

    # --- file operations --------------------------------------------------------

    def _op_getattr(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        return self._run(unique, self.fs.getattr(), _encode_attr, interruptible=True)

    def _op_setattr(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        changes = requests.setattr_in(buf, off, end, time.time_ns())
        if changes.kill_setid:
            self.fs.kill_setid()  # an unprivileged truncate
        return self._run(unique, self.fs.setattr(changes), _encode_attr)

    def _op_open(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        flags, open_flags = requests.body(abi.OPEN_IN, buf, off, end, "OPEN")
        if open_flags & abi.OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
            self.fs.kill_setid()
        return self._run(unique, self.fs.open(flags), _encode_open)

    def _op_read(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        if end - off < 40:
            raise requests.RequestError(f"READ: body of {end - off} bytes, need 40")
        fh, offset, size = _READ_HEAD.unpack_from(buf, off)
        return self._run(
            unique, self.fs.read(fh, offset, size), _encode_read, size, interruptible=True
        )

    def _op_write(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, offset, data, write_flags = requests.write_in(buf, off, end)
        if write_flags & abi.WRITE_KILL_SUIDGID:
            self.fs.kill_setid()
        size = len(data)
        if self._write_now is not None:
            # answered at once, straight from the receive buffer (no copy)
            try:
                written = self._write_now(fh, offset, data)
                if written is not None:
                    self._reply_ok(unique, _encode_write(written, size))
                    return False
            except BaseException as exc:  # noqa: B036 - every failure becomes an errno
                self._reply_exception(unique, exc)
                return False
        if size <= COPY_WRITE_MAX:
            return self._run(
                unique, self.fs.write(fh, offset, memoryview(bytes(data))), _encode_write, size
            )
        return self._run(unique, self.fs.write(fh, offset, data), _encode_write, size, buf)

    def _op_statfs(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        return self._run(unique, self.fs.statfs(), _encode_statfs, interruptible=True)

    def _op_release(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, flags, _rflags, _lo = requests.body(abi.RELEASE_IN, buf, off, end, "RELEASE")
        return self._run(unique, self.fs.release(fh, flags), _encode_nothing)

    def _op_flush(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, _u, _p, _lo = requests.body(abi.FLUSH_IN, buf, off, end, "FLUSH")
        return self._run(unique, self.fs.flush(fh), _encode_nothing)

    def _op_fsync(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, fsync_flags, _p = requests.body(abi.FSYNC_IN, buf, off, end, "FSYNC")
        datasync = bool(fsync_flags & abi.FSYNC_FDATASYNC)
        return self._run(unique, self.fs.fsync(fh, datasync), _encode_nothing)

    def _op_fallocate(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, offset, length, mode, _p = requests.body(abi.FALLOCATE_IN, buf, off, end, "FALLOCATE")
        return self._run(unique, self.fs.fallocate(fh, offset, length, mode), _encode_nothing)

    def _op_lseek(self, unique: int, buf: memoryview, off: int, end: int) -> bool:
        fh, offset, whence, _p = requests.body(abi.LSEEK_IN, buf, off, end, "LSEEK")
        return self._run(
            unique, self.fs.lseek(fh, offset, whence), _encode_lseek, interruptible=True
        )


def _resolve_and_mount(
    path: str,
    fsname: str,
    mount: Callable[..., Any],
    fd: int | None,
    options: MountOptions,
) -> tuple[str, int | None, int | None]:
    """Blocking, in a worker thread: (resolved path, fd from fusermount3 or
    None, the new mount's FUSE connection number or None)."""
    resolved = os.path.realpath(path)
    if fd is None:
        fd = mount(resolved, options)
        handed = fd
    else:
        mount(fd, resolved, options)
        handed = None
    connection = top_connection(resolved)
    if connection is None:
        try:
            found = find_mount(resolved, fsname)
        except OSError:
            found = None
        connection = found.connection if found else None
    return resolved, handed, connection


_ZEROS = memoryview(bytes(1 << 20))


def _extents_data(extents: list[Any]) -> Any:
    """The bytes of a read's extents, read without blocking; None when a
    page is not in memory (the caller awaits fs.read())."""
    parts: list[Any] = []
    for fd, off, n, never_blocks in extents:
        if fd < 0:
            while n:
                m = min(n, len(_ZEROS))
                parts.append(_ZEROS[:m])
                n -= m
            continue
        if never_blocks:
            data = os.pread(fd, n, off)
        else:
            buf = bytearray(n)
            try:
                if os.preadv(fd, [buf], off, os.RWF_NOWAIT) != n:
                    return None
            except OSError:
                return None
            data = buf
        if len(data) < n:
            data = bytes(data) + bytes(n - len(data))
        parts.append(data)
    return parts[0] if len(parts) == 1 else parts


# --- reply payload encoders: (handler result, request argument) -> payload -------
_HEAD = struct.Struct("<IIQ")  # len, opcode, unique: the start of fuse_in_header
_OUT = abi.OUT_HEADER
_READ_HEAD = struct.Struct("<QQI")  # fh, offset, size: the start of fuse_read_in
_READ = abi.READ


def _encode_attr(result: Any, _arg: int) -> bytes:
    return replies.attr(result)


def _encode_open(result: Any, _arg: int) -> bytes:
    return replies.open_out(result)


def _encode_statfs(result: Any, _arg: int) -> bytes:
    return replies.statfs_out(result)


def _encode_lseek(result: Any, _arg: int) -> bytes:
    return replies.lseek_out(result)


def _encode_nothing(_result: Any, _arg: int) -> None:
    return None


def _encode_read(data: Any, size: int) -> Any:
    if type(data) is list:
        return _ScatterReply(data, size)
    if len(data) > size:
        data = memoryview(data)[:size]
    return data


class _ScatterReply:
    """A read answered from several buffers, written with one writev (no join)."""

    __slots__ = ("parts", "length")

    def __init__(self, parts: list[Any], size: int) -> None:
        out = []
        length = 0
        for part in parts:
            n = len(part)
            if length + n > size:
                out.append(memoryview(part)[: size - length])
                length = size
                break
            out.append(part)
            length += n
        self.parts = out
        self.length = length

    def __len__(self) -> int:
        return self.length


def _encode_write(written: int, size: int) -> bytes:
    if not 0 <= written <= size:
        raise OSError(errno.EIO, f"write handler returned {written} for {size} bytes")
    return replies.write_out(written)


# opcode -> handler, shared by all sessions (a per-session table of bound
# methods would cost memory for every export).
_OPS: dict[int, Callable[[FuseSession, int, memoryview, int, int], bool]] = {
    abi.GETATTR: FuseSession._op_getattr,
    abi.SETATTR: FuseSession._op_setattr,
    abi.OPEN: FuseSession._op_open,
    abi.READ: FuseSession._op_read,
    abi.WRITE: FuseSession._op_write,
    abi.STATFS: FuseSession._op_statfs,
    abi.RELEASE: FuseSession._op_release,
    abi.FSYNC: FuseSession._op_fsync,
    abi.FLUSH: FuseSession._op_flush,
    abi.FALLOCATE: FuseSession._op_fallocate,
    abi.LSEEK: FuseSession._op_lseek,
    abi.LOOKUP: FuseSession._op_lookup,
    abi.INTERRUPT: FuseSession._op_interrupt,
    abi.FORGET: FuseSession._op_forget,
    abi.BATCH_FORGET: FuseSession._op_forget,
    abi.INIT: FuseSession._op_init,
    abi.DESTROY: FuseSession._op_destroy,
}
