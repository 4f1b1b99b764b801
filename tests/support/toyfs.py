"""Reference SingleFileFS implementations, used by tests and bench/fuse_micro.py
(test filesystems: not part of the shipped exportd package).

- MemoryFS: an in-memory sparse file (4 KiB allocation granularity, so
  SEEK_DATA/SEEK_HOLE and punch-hole have something to show).
- FileFS: a plain file served by pread/pwrite, or by kernel passthrough.
- FileExtentsFS: FileFS whose read_now answers with extents of the file.

`python -m tests.support.toyfs MOUNTPOINT [--size N] [--file PATH] ...` mounts
one and serves it until SIGTERM/SIGINT, printing "ready <counters-path>" on
stdout once INIT is done. On SIGUSR1 it writes its per-opcode counters as
JSON to the counters file (tests read them to check e.g. that no READ came).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import stat
import sys
import time

from exportd.block.posixio import RAMFS_MAGIC, TMPFS_MAGIC, fs_magic
from exportd.extents import Extent
from exportd.fuse.filesystem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    SEEK_DATA,
    SEEK_HOLE,
    Attr,
    OpenReply,
    SetAttr,
    SingleFileFS,
    StatFs,
    without_setid,
)

BLOCK = 4096


class MemoryFS(SingleFileFS):
    """A sparse in-memory file. `hang_reads` makes reads wait forever (tests)."""

    def __init__(self, size: int = 0, *, direct_io: bool = False, mode: int = 0o644) -> None:
        self.data = bytearray(size)
        self.allocated: set[int] = set()  # indexes of 4 KiB blocks holding data
        self.mode = mode
        self.uid = os.geteuid()
        self.gid = os.getegid()
        now = time.time_ns()
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.direct_io = direct_io
        self.hang_reads = False
        self.hung = asyncio.Event()
        self.opens = 0
        self.ended: str | None = None

    # --- helpers --------------------------------------------------------------
    def _resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
            last = (size + BLOCK - 1) // BLOCK
            self.allocated = {b for b in self.allocated if b < last}
            if size % BLOCK and (size // BLOCK) in self.allocated:
                pass  # partial tail block keeps its data
        else:
            self.data.extend(bytes(size - len(self.data)))

    def _zero(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)

    def _touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()

    # --- SingleFileFS ---------------------------------------------------------
    async def getattr(self) -> Attr:
        size = len(self.data)
        return Attr(
            size=size,
            mode=stat.S_IFREG | self.mode,
            uid=self.uid,
            gid=self.gid,
            atime_ns=self.atime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
            blocks=len(self.allocated) * (BLOCK // 512),
        )

    async def setattr(self, changes: SetAttr) -> Attr:
        if changes.size is not None:
            self._resize(changes.size)
            self._touch()
        if changes.mode is not None:
            self.mode = changes.mode & 0o7777
        if changes.uid is not None:
            self.uid = changes.uid
        if changes.gid is not None:
            self.gid = changes.gid
        if changes.mode is None and (changes.uid is not None or changes.gid is not None):
            self.mode = without_setid(self.mode)  # chown (HANDLE_KILLPRIV_V2)
        if changes.atime_ns is not None:
            self.atime_ns = changes.atime_ns
        if changes.mtime_ns is not None:
            self.mtime_ns = changes.mtime_ns
        self.ctime_ns = time.time_ns()
        return await self.getattr()

    async def open(self, flags: int) -> OpenReply:
        self.opens += 1
        if flags & os.O_TRUNC:
            self._resize(0)
            self._touch()
        return OpenReply(
            fh=self.opens, flags=FOPEN_DIRECT_IO if self.direct_io else FOPEN_KEEP_CACHE
        )

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        if self.hang_reads:
            self.hung.set()
            await asyncio.get_running_loop().create_future()  # never completes
        return memoryview(self.data)[offset : offset + size].tobytes()

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        end = offset + len(data)
        if end > len(self.data):
            self._resize(end)
        self.data[offset:end] = data
        self.allocated.update(range(offset // BLOCK, (end + BLOCK - 1) // BLOCK))
        self._touch()
        return len(data)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        end = offset + length
        first_full = (offset + BLOCK - 1) // BLOCK
        last_full = end // BLOCK
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, "punch hole needs KEEP_SIZE")
            self._zero(offset, length)
            self.allocated.difference_update(range(first_full, last_full))
        elif mode & FALLOC_FL_ZERO_RANGE:
            self._zero(offset, length)
            if end > len(self.data) and not mode & FALLOC_FL_KEEP_SIZE:
                self._resize(end)
            self.allocated.update(range(offset // BLOCK, (end + BLOCK - 1) // BLOCK))
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        else:
            if end > len(self.data) and not mode & FALLOC_FL_KEEP_SIZE:
                self._resize(end)
            self.allocated.update(range(offset // BLOCK, (end + BLOCK - 1) // BLOCK))
        self._touch()

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        size = len(self.data)
        if offset >= size:
            raise OSError(errno.ENXIO, "beyond end of file")
        block = offset // BLOCK
        if whence == SEEK_DATA:
            candidates = [b for b in self.allocated if b >= block]
            if not candidates:
                raise OSError(errno.ENXIO, "no data after offset")
            return max(offset, min(candidates) * BLOCK)
        if whence == SEEK_HOLE:
            while block * BLOCK < size and block in self.allocated:
                block += 1
            return min(max(offset, block * BLOCK), size)
        raise OSError(errno.EINVAL, f"whence {whence}")

    async def statfs(self) -> StatFs:
        blocks = (len(self.data) + BLOCK - 1) // BLOCK
        return StatFs(blocks=blocks, bfree=0, bavail=0, files=1, ffree=0, bsize=BLOCK, frsize=BLOCK)

    def on_session_end(self, reason: str) -> None:
        self.ended = reason


class FileFS(SingleFileFS):
    """A plain file, served with pread/pwrite or by kernel passthrough."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.backing_id = 0  # set by the owner after session.open_backing()

    async def getattr(self) -> Attr:
        st = os.fstat(self.fd)
        return Attr(
            size=st.st_size,
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            blocks=st.st_blocks,
        )

    async def setattr(self, changes: SetAttr) -> Attr:
        if changes.size is not None:
            os.ftruncate(self.fd, changes.size)
        if changes.mode is not None:
            os.fchmod(self.fd, changes.mode & 0o7777)
        return await self.getattr()

    async def open(self, flags: int) -> OpenReply:
        if flags & os.O_TRUNC:
            os.ftruncate(self.fd, 0)
        return OpenReply(
            fh=0, flags=0 if self.backing_id else FOPEN_KEEP_CACHE, backing_id=self.backing_id
        )

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        return os.pwrite(self.fd, data, offset)

    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(self.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        return os.lseek(self.fd, offset, whence)

    async def statfs(self) -> StatFs:
        s = os.fstatvfs(self.fd)
        return StatFs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize,
            s.f_namemax,
            s.f_frsize,
        )

    def close(self) -> None:
        os.close(self.fd)


class FileExtentsFS(FileFS):
    """FileFS whose read_now maps each read to the file's own range: the
    session splices, preads or awaits read() (fuse/readreply.py)."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        super().__init__(path, read_only=read_only)
        # tmpfs and ramfs pages never make a reader wait: reads may be spliced
        self.never_blocks = fs_magic(self.fd) in (TMPFS_MAGIC, RAMFS_MAGIC)
        self.splice_reads = self.never_blocks

    def read_now(self, fh: int, offset: int, size: int) -> list[Extent]:
        n = min(size, os.fstat(self.fd).st_size - offset)
        return [(self.fd, offset, n, self.never_blocks)] if n > 0 else []


async def _serve(args: argparse.Namespace) -> int:
    from exportd.fuse.passthrough import PassthroughUnavailable
    from exportd.fuse.session import FuseSession

    fs: SingleFileFS
    if args.file:
        fs_class = FileExtentsFS if args.extents else FileFS
        fs = fs_class(args.file, read_only=args.read_only)
    else:
        fs = MemoryFS(args.size, direct_io=args.direct_io)
        fs.hang_reads = args.hang_reads
        if args.fill:
            fs.data[:] = (bytes(range(256)) * (args.size // 256 + 1))[: args.size]
            fs.allocated.update(range((args.size + BLOCK - 1) // BLOCK))
    session = await FuseSession.start(
        fs,
        args.mountpoint,
        fsname=args.fsname,
        read_only=args.read_only,
        allow_other=args.allow_other,
        passthrough=args.passthrough,
    )
    if args.passthrough and isinstance(fs, FileFS):
        try:
            fs.backing_id = session.open_backing(fs.fd)
        except PassthroughUnavailable as e:
            print(f"passthrough unavailable: {e}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    def dump() -> None:
        with open(args.counters, "w") as f:
            json.dump(
                {"counters": session.counters, "passthrough": bool(getattr(fs, "backing_id", 0))}, f
            )

    if args.counters:
        loop.add_signal_handler(signal.SIGUSR1, dump)
    print("ready", flush=True)
    await asyncio.wait([stop, session.closed], return_when=asyncio.FIRST_COMPLETED)
    await session.close()
    if args.counters:
        dump()
    print(f"ended {session.closed.result()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.toyfs")
    p.add_argument("mountpoint")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument(
        "--fill", action="store_true", help="fill the in-memory file with a byte pattern"
    )
    p.add_argument("--file", help="serve this file instead of an in-memory one")
    p.add_argument("--fsname", default="exportd:toy")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--passthrough", action="store_true")
    p.add_argument(
        "--extents", action="store_true", help="with --file: read_now answers with extents"
    )
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--hang-reads", action="store_true", help="reads never finish (tests)")
    p.add_argument("--counters", help="where SIGUSR1 writes the opcode counters (JSON)")
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        return uvloop.run(_serve(args))
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
