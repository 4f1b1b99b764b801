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
from typing import TYPE_CHECKING

from exportd.block.node import Perm, Prealloc, Status
from exportd.export.hostio import HostFileIO, host_file
from exportd.extents import Extent
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

SEEK_PROBE = 1 << 62  # "to the end" for block_status
# file handles of opens the kernel serves by passthrough (others are 0)
FH_PASSTHROUGH_READER = 1
FH_PASSTHROUGH_WRITER = 2


class ExportedFile(SingleFileFS):
    def __init__(self, export: FuseExport) -> None:
        self.export = export
        self.mode = stat.S_IFREG | (0o600 if export.writable else 0o400)
        self.uid = os.getuid()
        self.gid = os.getgid()

    # --- helpers ----------------------------------------------------------------
    @property
    def node(self):  # noqa: ANN201 - BlockNode
        return self.export.node

    def length(self) -> int:
        return self.export.current_length()

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
        mine = self.export.edge
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
                await self.export.io.truncate(changes.size)
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
                await self.export.io.truncate(0)
            backing_id = exp.backing_id
            if backing_id and exp.passthrough_still_safe():
                # counted until release: the kernel serves this file without us
                exp.passthrough_opened(wants_write)
                return OpenReply(fh=FH_PASSTHROUGH_WRITER if wants_write else FH_PASSTHROUGH_READER,
                                 flags=0, backing_id=backing_id)
            return OpenReply(fh=0, flags=FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)

    async def release(self, fh: int, flags: int) -> None:
        if fh in (FH_PASSTHROUGH_READER, FH_PASSTHROUGH_WRITER):
            self.export.passthrough_released(fh == FH_PASSTHROUGH_WRITER)

    # --- data ---------------------------------------------------------------------
    # read and write are the hot path: the reference is taken inline rather
    # than through the request() context manager (same semantics)
    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        exp.refcount += 1
        try:
            return await exp.io.read(offset, size)
        finally:
            exp.unref()

    def read_now(self, fh: int, offset: int, size: int) -> bytes | list[Extent] | None:
        return self.export.io.read_now(offset, size)

    @property
    def splice_reads(self) -> bool:  # type: ignore[override]
        """Whether big reads can be spliced from the image (the session then
        mounts with a max_read that fits its pipe: fuse/splice.py)."""
        return self.node.data_never_blocks()

    def write_now(self, fh: int, offset: int, data: memoryview) -> int | None:
        return self.export.io.write_now(offset, data)

    def ring_io(self) -> HostFileIO | None:
        """Ring threads for an export of a host file; any other node (qcow2)
        would hand every request to the loop: one hop more than the
        loop-driven ring."""
        if host_file(self.export.node) is None:
            return None
        return HostFileIO(self.export)

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        exp.refcount += 1
        try:
            return await exp.io.write(offset, data)
        finally:
            exp.unref()

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        with self.export.request():
            if not self.export.writable:
                raise OSError(errno.EACCES, "read-only export")
            io = self.export.io
            size = self.length()
            if mode & FALLOC_FL_KEEP_SIZE:
                length = min(length, size - offset)
            if mode == 0:
                # plain allocation only grows the file (a truncate at EOF)
                if offset < size:
                    raise OSError(errno.EOPNOTSUPP, "fallocate inside the file")
                if offset > size:
                    await io.truncate(offset)
                await io.truncate(offset + length, Prealloc.FALLOC)
            elif mode & FALLOC_FL_PUNCH_HOLE:
                if not mode & FALLOC_FL_KEEP_SIZE:
                    raise OSError(errno.EINVAL, "punch hole needs keep size")
                if length > 0:
                    await io.write_zeroes(offset, length, may_unmap=True)
            elif mode & FALLOC_FL_ZERO_RANGE:
                if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
                    await io.truncate(offset + length)
                if length > 0:
                    await io.write_zeroes(offset, length, may_unmap=False)
            else:
                raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")

    async def flush(self, fh: int) -> None:
        with self.export.request():
            if self.export.writable:
                await self.export.io.flush()

    async def fsync(self, fh: int, datasync: bool) -> None:
        with self.export.request():
            await self.export.io.flush()

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
                    raise self.export.io.failed(e, "read") from None
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
