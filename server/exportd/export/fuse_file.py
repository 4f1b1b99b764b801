"""ExportedFile: the one file a FUSE export presents, on a block node.

Semantics follow QEMU's block/export/fuse.c (see README.md, "Exports"):
attributes (mode 0400/0600, daemon's uid/gid, size = node length, blocks from
the allocated size, blksize from the node's alignment, times = now), chmod and
chown rules, short reads and writes at EOF, growth only when growable,
truncate with a RESIZE permission held for that call, QEMU's fallocate rules,
SEEK_DATA/SEEK_HOLE from block_status. Every request holds a reference on the
export while it runs (BlockExport.request()).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from exportd.aio.resume import Resume
from exportd.block.node import Perm, Prealloc, Status
from exportd.errors import QMPError
from exportd.fuse.filesystem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FOPEN_DIRECT_IO,
    FOPEN_PARALLEL_DIRECT_WRITES,
    SEEK_DATA,
    SEEK_HOLE,
    Attr,
    OpenReply,
    SetAttr,
    SingleFileFS,
    StatFs,
    without_setid,
)

if TYPE_CHECKING:
    from exportd.export.fuse import FuseExport

log = logging.getLogger(__name__)
T = TypeVar("T")

ZERO_CHUNK = 64 * 1024 * 1024  # write_zeroes in pieces: bounded memory for drivers that write buffers
SEEK_PROBE = 1 << 62  # "to the end" for block_status

# errnos a client can act on pass through; anything else from a backend is EIO
_PASS_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EINVAL,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOMEM,
        errno.EOPNOTSUPP,
        errno.EINTR,
    }
)


def backend_errno(e: OSError) -> OSError:
    code = e.errno if e.errno in _PASS_ERRNOS else errno.EIO
    return OSError(code, os.strerror(code))


_SYNC_IO: dict[type, tuple[Any, Any, Any]] = {}


def _defining_class(cls: type, name: str) -> type | None:
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` even when the request is cancelled (hard delete, the
    session closing). A change to the image may already run in a worker
    thread and lands whatever we do, so the request keeps its reference on
    the export until it has: BLOCK_EXPORT_DELETED never precedes a write.
    Work that finishes without waiting (tmpfs, page cache) runs inline."""
    try:
        pending = work.send(None)
    except StopIteration as stop:
        return stop.value
    task = asyncio.ensure_future(_drive(Resume(work, pending)))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _drive(work: Resume) -> Any:
    return await work


def _sync_io(node: Any) -> tuple[Any, Any, Any]:
    """(read_now, write_now, read_sources_now) functions of a node's class,
    each None unless the class defines it next to the read()/write() it
    stands for (a subclass that overrides read() must not be bypassed)."""
    cls = type(node)
    found = _SYNC_IO.get(cls)
    if found is None:
        found_list = []
        for sync, async_ in (("read_now", "read"), ("write_now", "write"), ("read_sources_now", "read")):
            owner = _defining_class(cls, sync)
            ok = owner is not None and owner is _defining_class(cls, async_)
            found_list.append(getattr(cls, sync) if ok else None)
        found = _SYNC_IO[cls] = (found_list[0], found_list[1], found_list[2])
    return found


def _readable(exp: FuseExport, offset: int, size: int) -> int:
    """How many of `size` bytes at `offset` lie before the export's end (0: none)."""
    length = exp.current_length()
    if offset >= length or size <= 0:
        return 0
    return min(size, length - offset)


class ExportedFile(SingleFileFS):
    def __init__(self, export: FuseExport) -> None:
        self.export = export
        self.mode = stat.S_IFREG | (0o600 if export.writable else 0o400)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._resize_holders = 0  # truncates in flight holding a temporary RESIZE
        self._growth = asyncio.Lock()  # writes past the end grow one at a time

    # --- helpers ----------------------------------------------------------------
    @property
    def node(self):  # noqa: ANN201 - BlockNode
        return self.export.node

    def length(self) -> int:
        return self.export.current_length()

    @asynccontextmanager
    async def _resize_permission(self) -> AsyncIterator[None]:
        """RESIZE for the duration of one truncate, unless the export holds it
        for good (growable). Conflicts with other users give EPERM."""
        exp = self.export
        user = exp.node_user
        if exp.growable or user is None:
            yield
            return
        if self._resize_holders == 0:
            try:
                exp.node.update(user, user.perm | Perm.RESIZE, user.shared)
            except QMPError as e:
                log.info("export %s: no resize permission: %s", exp.id, e.desc)
                raise OSError(errno.EPERM, e.desc) from None
        self._resize_holders += 1
        try:
            yield
        finally:
            self._resize_holders -= 1
            if self._resize_holders == 0 and exp.node_user is not None:
                try:
                    exp.node.update(user, user.perm & ~Perm.RESIZE, user.shared)
                except QMPError:  # giving up a permission cannot conflict
                    log.exception("export %s: dropping RESIZE failed", exp.id)

    async def _truncate(self, size: int, prealloc: Prealloc = Prealloc.OFF) -> None:
        async with self._resize_permission():
            try:
                await _to_the_end(self.node.truncate(size, prealloc=prealloc, exact=True))
            except OSError as e:
                raise backend_errno(e) from None
        self.export.length_changed()

    async def _grow_to(self, end: int) -> None:
        """Grow, never shrink, to `end` for a write past the end. Growing
        writes may finish out of order: each one re-reads the length under
        the lock, so a nearer end never truncates a farther write away."""
        async with self._growth:
            if self.export.current_length() < end:
                await self._truncate(end)

    async def _write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            try:
                await _to_the_end(self.node.write_zeroes(offset, n, may_unmap=may_unmap))
            except OSError as e:
                raise backend_errno(e) from None
            offset += n
        if self.export.writethrough:  # zeroing is a write: durable before the reply
            try:
                await self.node.flush()
            except OSError as e:
                raise backend_errno(e) from None

    # --- attributes ---------------------------------------------------------------
    async def getattr(self) -> Attr:
        with self.export.request():
            return await self._attr()

    async def _attr(self) -> Attr:
        length = self.length()
        try:
            allocated = await self.node.allocated_size()
        except OSError:
            allocated = -1
        blocks = -(-(allocated if allocated > 0 else length) // 512)
        now = time.time_ns()
        return Attr(
            size=length,
            mode=self.mode,
            uid=self.uid,
            gid=self.gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            blocks=blocks,
            blksize=max(1, self.node.request_alignment),
            valid_s=self._attr_validity(),
        )

    def _attr_validity(self) -> float:
        """How long the kernel may cache the size: QEMU's one second, unless
        someone else may resize or write the node (another export, a parent
        node), so that the size this mount shows is always the current one."""
        mine = self.export.node_user
        for user in self.node.users:
            if user is not mine and user.perm & (Perm.WRITE | Perm.RESIZE):
                return 0.0
        return 1.0

    async def setattr(self, changes: SetAttr) -> Attr:
        with self.export.request():
            exp = self.export
            if (changes.uid is not None or changes.gid is not None) and not exp.allow_other:
                raise OSError(errno.ENOTSUP, "chown needs allow_other")
            # check everything before changing anything
            if changes.mode is not None:
                if not exp.allow_other and changes.mode & (stat.S_IRWXG | stat.S_IRWXO):
                    # without allow_other nobody else can open it: refuse to pretend
                    raise OSError(errno.EPERM, "group/other bits need allow_other")
                if not exp.writable and changes.mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                    raise OSError(errno.EROFS, "read-only export")
            if changes.size is not None:
                if not exp.writable:
                    raise OSError(errno.EACCES, "read-only export")
                await self._truncate(changes.size)
            if changes.mode is not None:
                self.mode = stat.S_IFREG | (changes.mode & 0o7777)
            if changes.uid is not None:
                self.uid = changes.uid
            if changes.gid is not None:
                self.gid = changes.gid
            if changes.mode is None and (changes.uid is not None or changes.gid is not None):
                self.mode = without_setid(self.mode)  # chown (HANDLE_KILLPRIV_V2)
            # times are not stored: they always read as "now" (QEMU does the same)
            return await self._attr()

    # --- open / close -----------------------------------------------------------------
    async def open(self, flags: int) -> OpenReply:
        with self.export.request():
            exp = self.export
            wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY
            if wants_write and not exp.writable:
                raise OSError(errno.EACCES, "read-only export")
            if flags & os.O_TRUNC and wants_write and exp.growable:
                await self._truncate(0)
            backing_id = exp.backing_id
            if backing_id:
                return OpenReply(fh=0, flags=0, backing_id=backing_id)
            return OpenReply(fh=0, flags=FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)

    async def release(self, fh: int, flags: int) -> None:
        return None

    # --- data ---------------------------------------------------------------------
    # read and write are the hot path: the reference is taken inline rather
    # than through the request() context manager (same semantics)
    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        exp.refcount += 1
        try:
            size = _readable(exp, offset, size)
            if not size:
                return b""
            try:
                return await exp.node.read(offset, size)
            except OSError as e:
                raise backend_errno(e) from None
        finally:
            exp.unref()

    # Synchronous twins for the session's inline path: the same answer as
    # read()/write() when the node can serve the request without waiting,
    # None (nothing done) when the session must await the coroutine. No
    # reference is taken: nothing can release the export before they return.
    def read_now(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview | None:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        node = exp.node
        read_now = _sync_io(node)[0]
        if read_now is None:
            return None
        size = _readable(exp, offset, size)
        if not size:
            return b""
        try:
            return read_now(node, offset, size)
        except OSError as e:
            raise backend_errno(e) from None

    @property
    def splice_reads(self) -> bool:
        """Whether big reads can be spliced from the image (the session then
        mounts with a max_read that fits its pipe: fuse/splice.py)."""
        node = self.export.node
        if _sync_io(node)[2] is None:
            return False
        while node is not None:  # down to the file node that holds the data
            never_block = getattr(node, "pages_never_block", None)
            if never_block is not None:
                return bool(never_block)
            node = node.children.get("file")
        return False

    def read_sources_now(self, fh: int, offset: int, size: int) -> list[tuple[int, int, int]] | None:
        """The file pieces a READ's reply can be spliced from (see
        read_now for the rules); None: answer with read_now or read."""
        exp = self.export
        if not exp.user_owned:
            return None
        node = exp.node
        sources = _sync_io(node)[2]
        if sources is None:
            return None
        size = _readable(exp, offset, size)
        if not size:
            return None
        try:
            return sources(node, offset, size)
        except OSError:
            return None  # read_now or read reports it

    def write_now(self, fh: int, offset: int, data: memoryview) -> int | None:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        if not exp.writable:
            raise OSError(errno.EACCES, "read-only export")
        node = exp.node
        write_now = _sync_io(node)[1]
        size = len(data)
        if write_now is None or exp.writethrough or offset + size > exp.current_length():
            return None  # flush, growth or the end of the file: the async path
        try:
            return size if write_now(node, offset, data) else None
        except OSError as e:
            raise backend_errno(e) from None

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        exp.refcount += 1
        try:
            if not exp.writable:
                raise OSError(errno.EACCES, "read-only export")
            size = len(data)
            length = exp.current_length()
            if offset + size > length:
                if exp.growable:
                    await self._grow_to(offset + size)
                elif offset >= length:
                    return 0  # the kernel turns this into ENOSPC for the writer
                else:
                    size = length - offset
                    data = data[:size]
            try:
                await _to_the_end(exp.node.write(offset, data))
                if exp.writethrough:
                    await exp.node.flush()
            except OSError as e:
                raise backend_errno(e) from None
            return size
        finally:
            exp.unref()

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        with self.export.request():
            if not self.export.writable:
                raise OSError(errno.EACCES, "read-only export")
            size = self.length()
            if mode & FALLOC_FL_KEEP_SIZE:
                length = min(length, size - offset)
            if mode == 0:
                # plain allocation only grows the file (a truncate at EOF)
                if offset < size:
                    raise OSError(errno.EOPNOTSUPP, "fallocate inside the file")
                if offset > size:
                    await self._truncate(offset)
                await self._truncate(offset + length, Prealloc.FALLOC)
            elif mode & FALLOC_FL_PUNCH_HOLE:
                if not mode & FALLOC_FL_KEEP_SIZE:
                    raise OSError(errno.EINVAL, "punch hole needs keep size")
                if length > 0:
                    await self._write_zeroes(offset, length, may_unmap=True)
            elif mode & FALLOC_FL_ZERO_RANGE:
                if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
                    await self._truncate(offset + length)
                if length > 0:
                    await self._write_zeroes(offset, length, may_unmap=False)
            else:
                raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")

    async def flush(self, fh: int) -> None:
        with self.export.request():
            if self.export.writable:
                await self._flush()

    async def fsync(self, fh: int, datasync: bool) -> None:
        with self.export.request():
            await self._flush()

    async def _flush(self) -> None:
        try:
            await self.node.flush()
        except OSError as e:
            raise backend_errno(e) from None

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        with self.export.request():
            if whence not in (SEEK_DATA, SEEK_HOLE):
                raise OSError(errno.EINVAL, "bad whence")
            rounds = 0
            while True:
                rounds += 1
                if rounds % 256 == 0:
                    await asyncio.sleep(0)  # many small extents: let other requests run
                try:
                    bs = await self.node.block_status(offset, SEEK_PROBE)
                except OSError as e:
                    raise backend_errno(e) from None
                if bs.length <= 0 and bs.status & Status.EOF or offset >= self.length():
                    # a hole between the real EOF and a rounded visible length;
                    # nothing at or past the visible EOF
                    if offset > self.length() or whence == SEEK_DATA:
                        raise OSError(errno.ENXIO, "past end of file")
                    return offset
                if bs.status & Status.DATA:
                    if whence == SEEK_DATA:
                        return offset
                elif whence == SEEK_HOLE:
                    return offset
                if bs.length <= 0:
                    raise OSError(errno.ENXIO, "no progress")
                offset += bs.length

    async def statfs(self) -> StatFs:
        with self.export.request():
            bsize = max(512, self.node.request_alignment)
            return StatFs(bsize=bsize, frsize=bsize, namelen=255)

    def on_session_end(self, reason: str) -> None:
        self.export.session_ended(reason)
