"""One FUSE session: a mounted single-file filesystem served on the asyncio loop.

    session = await FuseSession.start(fs, mountpoint, fsname="exportd:x",
                                      read_only=False, allow_other=False,
                                      passthrough=False, io_uring="auto")
    reason = await session.closed        # or: await session.close()

This module is the session's life cycle (State): mount, INIT, close, end.
The requests themselves go through its channel (channel.py: the /dev/fuse
fd, read loop and replies) to the opcode table (opcodes.py), and through
FUSE over io_uring (uring.py) when INIT negotiated it: io_uring="auto" uses
it when the kernel allows, "on" fails the start when it cannot (the
reason: IoUringUnavailable), "off" stays on /dev/fuse.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from exportd.aio.threads import in_own_thread

from . import abi, opcodes, replies
from .channel import MAX_WRITE, Channel
from .filesystem import SingleFileFS
from .mount import (
    MountError,
    MountOptions,
    mount_fusermount,
    mount_root,
    open_dev_fuse,
    resolve_and_mount,
    unmount_if_ours,
)
from .passthrough import BackingFiles, PassthroughUnavailable
from .splice import SPLICE_MAX_READ, pipe_for
from .uring import FuseRing, depth_from_env, possible_cpus, threads_from_env, unavailable_reason

log = logging.getLogger(__name__)

INVALIDATE_TIMEOUT_S = 10.0  # a kernel stuck on a page lock: give up waiting, not the loop


IO_URING_MODES = ("auto", "on", "off")


class IoUringUnavailable(OSError):
    """io_uring="on" and FUSE over io_uring cannot be used; the text says why."""


class State(enum.Enum):
    MOUNTING = "mounting"  # mount under way, or mounted and waiting for the kernel's INIT
    READY = "ready"  # INIT answered: serving
    CLOSING = "closing"  # unmounting (close(), or a protocol failure: halt)
    ENDED = "ended"  # fd closed, owner told; `closed` holds the reason


class FuseSession:
    """A mounted single-file FUSE filesystem served on one asyncio loop."""

    def __init__(
        self,
        fs: SingleFileFS,
        mountpoint: str,
        options: MountOptions,
        *,
        passthrough: bool,
        io_uring: str = "off",
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.fsname = options.fsname
        self.want_passthrough = passthrough
        self.passthrough_available = False
        # FUSE over io_uring: asked for in INIT, and whether it serves
        self.io_uring_mode = io_uring
        self.want_io_uring = io_uring != "off"
        self.io_uring = False
        self.io_uring_reason = ""  # why not, when it was wanted and does not serve
        self.connection: int | None = None  # FUSE connection number (fusectl)
        self.proto_minor = 0
        self.max_write = MAX_WRITE
        self.state = State.MOUNTING
        # the requests; its fd is opened by _mount
        self.channel = Channel(
            -1, fs, self, opcodes.BEFORE_INIT,
            # READ replies spliced when mounted for it (max_read fits the pipe)
            splice=pipe_for(loop) if options.max_read <= SPLICE_MAX_READ else None,
            loop=loop,
        )
        # resolves to the reason the session ended (see filesystem.py)
        self.closed: asyncio.Future[str] = loop.create_future()
        self._loop = loop
        self._backing = BackingFiles()
        self._init_answered: asyncio.Future[None] = loop.create_future()
        self._closer: asyncio.Task[None] | None = None  # the unmount (state CLOSING)
        self._cleanup: asyncio.Task[None] | None = None  # referenced until done

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
        io_uring: str = "off",
        loop: asyncio.AbstractEventLoop | None = None,
        init_timeout: float = 10.0,
    ) -> FuseSession:
        """Mount `fs` over the regular file `mountpoint` and serve it.

        Returns once the kernel's INIT is answered. Raises MountError (an
        OSError) with the kernel's or fusermount3's message when mounting
        fails, TimeoutError when INIT never comes, IoUringUnavailable when
        io_uring is "on" and cannot be used (nothing is left mounted).
        """
        if io_uring not in IO_URING_MODES:
            raise ValueError(f"io_uring must be one of {IO_URING_MODES}, not {io_uring!r}")
        reason = unavailable_reason() if io_uring != "off" else ""
        if reason:
            if io_uring == "on":
                raise IoUringUnavailable(errno.EOPNOTSUPP, reason)
            io_uring = "off"  # auto: do not even ask the kernel
        loop = loop or asyncio.get_running_loop()
        splice_reads = fs.splice_reads and pipe_for(loop).usable
        options = MountOptions(
            fsname=fsname,
            read_only=read_only,
            allow_other=allow_other,
            # a spliced reply must fit the pipe, header included
            max_read=SPLICE_MAX_READ if splice_reads else MAX_WRITE,
        )
        self = cls(fs, mountpoint, options, passthrough=passthrough, io_uring=io_uring, loop=loop)
        self.io_uring_reason = reason
        await self._mount()
        try:
            await asyncio.wait_for(asyncio.shield(self._init_answered), init_timeout)
            if io_uring == "on" and not self.io_uring:
                raise IoUringUnavailable(errno.EOPNOTSUPP, self.io_uring_reason)
        except BaseException:
            await self.close()
            raise
        return self

    async def _mount(self) -> None:
        # One worker thread resolves the path (mountinfo lists the resolved
        # one, and after the mount a lookup of it would be served by this
        # loop), mounts, and finds the new connection, while the loop is free
        # to answer INIT (mount.resolve_and_mount).
        path = self.mountpoint
        if os.geteuid() == 0:
            # The fd only becomes readable once mount(2) attached it to a
            # connection (before that, read gives EPERM); INIT waits queued.
            fd = open_dev_fuse()
            try:
                resolved, _, connection = await self._in_mount_thread(
                    resolve_and_mount, path, self.fsname, mount_root, fd, self.options
                )
            except BaseException:
                os.close(fd)
                raise
        else:
            resolved, fd, connection = await self._in_mount_thread(
                resolve_and_mount, path, self.fsname, mount_fusermount, None, self.options
            )
        self.mountpoint = resolved
        self.channel.fd = fd
        self.channel.start_reading()
        self.connection = connection

    async def _in_mount_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a mount call in a thread. If we are cancelled meanwhile, the
        thread still finishes: undo its mount so nothing stale stays behind."""
        work = asyncio.ensure_future(in_own_thread(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            try:
                resolved, fd, _ = await work
            except Exception:
                raise asyncio.CancelledError from None
            if fd is not None:
                os.close(fd)  # the fd fusermount3 handed over
            await in_own_thread(unmount_if_ours, resolved, None, lazy=True)
            raise

    async def close(self) -> None:
        """Unmount and stop serving. Idempotent; safe from any task."""
        if self.state is State.ENDED:
            return
        if self.state is not State.CLOSING:
            self._begin_shutdown("closed")
        assert self._closer is not None
        await asyncio.shield(self._closer)

    def _begin_shutdown(self, reason: str) -> None:
        self.state = State.CLOSING
        self._closer = self._loop.create_task(self._shutdown(reason))

    async def _shutdown(self, reason: str) -> None:
        try:
            await in_own_thread(unmount_if_ours, self.mountpoint, self.connection)
        except OSError as e:
            log.warning("%s: unmount failed: %s", self.mountpoint, e)
        self._end(reason)

    def _end(self, reason: str) -> None:
        """Release everything; tell the owner. Runs once."""
        if self.state is State.ENDED:
            return
        self.state = State.ENDED
        if not self._init_answered.done():
            self._init_answered.set_exception(
                MountError(errno.EIO, f"session ended before INIT: {reason}")
            )
            self._init_answered.exception()  # mark retrieved
        self.channel.stop_reading()
        self._backing.close_all(self.channel.fd)
        self.channel.close()
        self.closed.set_result(reason)
        log.info("%s: FUSE session ended (%s)", self.mountpoint, reason)
        try:
            self.fs.on_session_end(reason)
        except Exception:
            log.exception("%s: on_session_end failed", self.mountpoint)

    # --- what the channel tells us (channel.Owner) ----------------------------------

    def initialized(self, minor: int, flags: int) -> None:
        self.proto_minor = minor
        self.passthrough_available = bool(flags & abi.PASSTHROUGH)
        if self.want_io_uring and self.state is State.MOUNTING:
            if flags & abi.OVER_IO_URING:
                self._start_ring()
            else:
                self.io_uring_reason = (
                    f"the kernel did not offer FUSE_OVER_IO_URING in INIT (protocol 7.{minor})"
                )
        if self.state is State.MOUNTING:
            self.state = State.READY
        if not self._init_answered.done():
            self._init_answered.set_result(None)

    def _start_ring(self) -> None:
        """Register the ring entries (INIT is answered: the kernel knows
        max_write, which the payload buffers must hold)."""
        ring = None
        try:
            ring = FuseRing(
                self.channel,
                queues=possible_cpus(),
                depth=depth_from_env(),
                payload=max(abi.MIN_READ_BUFFER, self.max_write),
                rio=self.fs.ring_io() if threads_from_env() else None,
            )
            ring.register()
        except OSError as e:
            if ring is not None:
                ring.close()
            self.io_uring_reason = f"FUSE over io_uring set-up failed: {e.strerror or e}"
            log.info("%s: %s; serving through /dev/fuse", self.mountpoint, self.io_uring_reason)
            return
        self.channel.use_ring(ring)
        self.io_uring = True
        self.io_uring_reason = ""
        log.debug("%s: FUSE over io_uring, %d queues of %d", self.mountpoint, ring.queues, ring.depth)

    def destroyed(self) -> None:
        if self.state is not State.CLOSING:
            self._end("destroy")

    def halt(self, reason: str) -> None:
        """Stop trusting the device; unmount and end in the background."""
        log.error("%s: halting FUSE session: %s", self.mountpoint, reason)
        self.channel.stop_reading()
        if self.state is State.MOUNTING or self.state is State.READY:
            self._begin_shutdown("error: " + reason)

    def gone(self) -> None:
        """The device says the connection is over (unmounted or aborted)."""
        self.channel.stop_reading()
        if self.state is State.CLOSING:
            return  # _shutdown finishes the job
        if self.state is State.ENDED:
            return
        self._end("unmounted")
        # An aborted connection may leave its mount behind (ENOTCONN); drop it.
        self._cleanup = self._loop.create_task(self._drop_dead_mount())

    async def _drop_dead_mount(self) -> None:
        try:
            await in_own_thread(unmount_if_ours, self.mountpoint, self.connection, lazy=True)
        except Exception as e:  # best effort
            log.debug("%s: no dead mount to drop: %s", self.mountpoint, e)

    # --- introspection -----------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Requests seen per opcode name (only nonzero ones)."""
        ch = self.channel
        counts = list(ch.counts)
        if ch.ring is not None:  # what ring threads answered never reached the channel
            for t in ch.ring.threads:
                counts[abi.READ] += t.reads
                counts[abi.WRITE] += t.writes
        out = {abi.opcode_name(op): n for op, n in enumerate(counts) if n}
        out.update({abi.opcode_name(op): n for op, n in ch.other_counts.items()})
        return out

    def count(self, opcode_name: str) -> int:
        return self.counters.get(opcode_name, 0)

    @property
    def in_flight(self) -> int:
        return self.channel.in_flight

    @property
    def ring_served(self) -> int:
        """Requests that came through FUSE over io_uring (tests, benchmarks)."""
        ring = self.channel.ring
        return 0 if ring is None else ring.served

    @property
    def spliced(self) -> int:
        """READ replies sent by splice (tests, benchmarks)."""
        return self.channel.spliced

    # --- passthrough ------------------------------------------------------------

    async def invalidate_cache(self) -> None:
        """Make the kernel forget the file's cached attributes (size) and
        pages, after the data behind the mount changed under it (its block
        node was replaced). The write runs in a worker thread: the kernel may
        wait there for a page lock held by a request that waits for us."""
        fd = self.channel.fd
        if self.state is not State.READY or fd < 0:
            return
        message = replies.inval_inode()
        try:
            await in_own_thread(os.write, fd, message, timeout=INVALIDATE_TIMEOUT_S)
        except OSError as e:  # ENOENT: nothing cached; a dead connection: nothing to do
            log.debug("%s: cache invalidation: %s", self.mountpoint, e)

    def open_backing(self, fd: int) -> int:
        """Register `fd` as a passthrough backing file; returns the backing id.

        Raises PassthroughUnavailable when passthrough was not negotiated or
        the kernel refuses (e.g. EPERM without CAP_SYS_ADMIN).
        """
        dev_fd = self.channel.fd
        if not self.passthrough_available or dev_fd < 0:
            raise PassthroughUnavailable(
                errno.EOPNOTSUPP, "FUSE passthrough not negotiated with the kernel"
            )
        return self._backing.open(dev_fd, fd)

    def close_backing(self, backing_id: int) -> None:
        self._backing.close(self.channel.fd, backing_id)
