"""Benchmark peer: the single-file FUSE filesystem a Python developer would write.

It is mounted over a regular file (libfuse takes the root mode from the
mountpoint, so the root inode *is* the file) and serves the raw image with
plain os.pread/os.pwrite in its async handlers, on pyfuse3's default trio
main loop. Nothing is tuned on purpose: it is the baseline exportd must beat.

    python bench/peers/pyfuse3_file.py IMAGE MOUNTPOINT

Stops (and unmounts) on SIGTERM or SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


class SingleFileFS(pyfuse3.Operations):
    """One inode, the root, which is a regular file backed by IMAGE."""

    def __init__(self, image_fd: int) -> None:
        super().__init__()
        self.fd = image_fd

    def _attributes(self) -> pyfuse3.EntryAttributes:
        st = os.fstat(self.fd)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.st_mode = stat.S_IFREG | 0o600
        attrs.st_nlink = 1
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_size = st.st_size
        attrs.st_blksize = 4096
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes()

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            os.ftruncate(self.fd, attr.st_size)
        return self._attributes()

    async def open(self, inode, flags, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        os.fsync(self.fd)

    async def release(self, fh):
        pass


async def serve_until_signal() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                break


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    image, mountpoint = argv
    image_fd = os.open(image, os.O_RDWR)
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3_file")
    pyfuse3.init(SingleFileFS(image_fd), mountpoint, options)
    try:
        trio.run(serve_until_signal)
    finally:
        pyfuse3.close(unmount=True)
        os.close(image_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
