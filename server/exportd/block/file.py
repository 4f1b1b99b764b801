"""Protocol drivers `file` (regular files) and `host_device` (block devices).

The file is opened once, at blockdev-add; the descriptor is kept for the
node's life and the path is never used again (an export may be mounted over
the image file itself, after which the path names the export, not the file).

Where I/O runs (numbers in exportd.block.posixio): reads that hit the page
cache are served inline with preadv(RWF_NOWAIT); misses, writes, fallocate,
fdatasync and lseek go to the I/O threads. Files on tmpfs/ramfs never wait
for a disk and are served inline entirely. cache.direct (O_DIRECT) always
uses threads. Option `x-io-policy=threads` turns the inline paths off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from exportd.aio.threads import in_background, in_io_thread, in_own_thread
from exportd.block import register_driver
from exportd.block.file_create import file_create_steps
from exportd.block.locking import ImageLock, probe
from exportd.block.node import BlockNode, BlockStatus, Perm, Prealloc, Status
from exportd.block.options import get_enum, get_str
from exportd.block.posixio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    LOCAL_FS_MAGICS,
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    aligned_buffer,
    blockdev_sector_size,
    blockdev_size,
    fallocate,
    fs_magic,
)
from exportd.errors import BlockError
from exportd.extents import Extent, zeroes

FILE_MEMBERS = frozenset(
    {"filename", "pr-manager", "locking", "aio", "aio-max-batch", "drop-cache",
     "x-check-cache-dropped", "x-io-policy"}
)
DIRECT_ALIGNMENT = 4096  # safe for every logical block size up to 4 KiB
ZERO_CHUNK = 1 << 20


class _RangeLocks:
    """Serialises overlapping O_DIRECT writes when one of them is a
    read-modify-write of partial blocks (else it could undo the other)."""

    def __init__(self) -> None:
        self._active: list[tuple[int, int, bool, asyncio.Event]] = []

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int, exclusive: bool) -> AsyncIterator[None]:
        while True:
            blocker = next(
                (e for s, t, x, e in self._active if s < end and start < t and (x or exclusive)),
                None,
            )
            if blocker is None:
                break
            await blocker.wait()
        entry = (start, end, exclusive, asyncio.Event())
        self._active.append(entry)
        try:
            yield
        finally:
            self._active.remove(entry)
            entry[3].set()


def _close_opened(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result()[0])


@register_driver
class FileNode(BlockNode):
    driver = "file"
    option_members = FILE_MEMBERS
    # exportd ignores these at open too; filename, locking, aio, x-io-policy are fixed
    reopen_members = frozenset({"aio-max-batch", "drop-cache", "x-check-cache-dropped"})

    def __init__(self, node_name: str, *, read_only: bool, fd: int, filename: str,
                 size: int, direct: bool, discard_unmap: bool, lock: ImageLock | None,
                 inline: bool, nowait_reads: bool, no_flush: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self.fd = fd  # exports may use it (e.g. FUSE passthrough); never closed early
        self._filename = filename
        self._size = size
        self.direct = direct
        self.discard_unmap = discard_unmap
        self._lock = lock
        self._inline = inline
        self._nowait_reads = nowait_reads
        self._nowait_writes = nowait_reads  # until the file system refuses it
        self._no_flush = no_flush
        self._ranges = _RangeLocks()
        self._local_fs = False  # fstat never blocks (set at open)
        self.request_alignment = DIRECT_ALIGNMENT if direct else 1

    # --- creating (blockdev-create driver=file) ---------------------------------
    @classmethod
    def create_steps(cls, graph: Any, options: dict[str, Any]) -> tuple[Any, Any] | None:
        return file_create_steps(options)

    # --- opening ----------------------------------------------------------
    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> FileNode:
        filename = get_str(options, "filename")
        locking = get_enum(options, "locking", ("auto", "on", "off"), "auto")
        aio = get_enum(options, "aio", ("threads", "native", "io_uring"), "threads")
        policy = get_enum(options, "x-io-policy", ("auto", "threads"), "auto")
        if aio == "native" and not options["cache"]["direct"]:
            raise BlockError("aio=native was specified, but it requires cache.direct=on, which was not specified.")
        # aio=native|io_uring are accepted for compatibility with QEMU's
        # clients (libvirt asks for native with cache.direct) and served by the
        # same I/O threads; query shows what was asked.
        read_only = options["read-only"]
        direct = options["cache"]["direct"]
        # everything that touches the file runs in a thread: it may live on a
        # FUSE mount, even one this daemon serves
        opening = in_io_thread(
            cls._open_fd, filename, read_only, direct, options.get("auto-read-only", False),
            locking != "off",
        )
        try:
            fd, read_only, st, magic, lockable = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)  # the caller is gone: no fd leak
            raise
        try:
            size = cls._check_type(filename, fd, st)
            lock = None
            if lockable:
                lock = ImageLock(fd, filename)
            elif locking == "on":
                raise BlockError(f"Could not open '{filename}': the file system does not support OFD locks")
            inline = policy == "auto" and not direct and magic in (TMPFS_MAGIC, RAMFS_MAGIC)
            node = cls(
                node_name, read_only=read_only, fd=fd, filename=filename, size=size,
                direct=direct, discard_unmap=options["discard"] == "unmap", lock=lock,
                inline=inline, nowait_reads=policy == "auto" and not direct and not inline,
                no_flush=options["cache"]["no-flush"],
            )
            node._local_fs = magic in LOCAL_FS_MAGICS
            if direct and stat.S_ISBLK(st.st_mode):
                node.request_alignment = max(blockdev_sector_size(fd), 512)
            return node
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_fd(filename: str, read_only: bool, direct: bool, auto_ro: bool,
                 want_locks: bool) -> tuple[int, bool, os.stat_result, int, bool]:
        flags = os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(filename, flags | (os.O_RDONLY if read_only else os.O_RDWR))
        except OSError as e:
            fd = -1
            if not read_only and auto_ro and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                try:
                    fd, read_only = os.open(filename, flags | os.O_RDONLY), True
                except OSError as e2:
                    e = e2
            if fd < 0:
                raise BlockError(f"Could not open '{filename}': {os.strerror(e.errno or 0)}") from None
        try:
            return fd, read_only, os.fstat(fd), fs_magic(fd), want_locks and probe(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _check_type(cls, filename: str, fd: int, st: os.stat_result) -> int:
        if not stat.S_ISREG(st.st_mode):
            raise BlockError(f"'file' driver requires '{filename}' to be a regular file")
        return st.st_size

    async def close(self) -> None:
        if self.fd < 0:
            return
        if self._lock is not None:
            self._lock.release()
        fd, self.fd = self.fd, -1
        if self._local_fs:
            os.close(fd)
        else:
            # closing sends FLUSH to a FUSE server, which may be this loop
            # (an image on one of our own exports)
            await in_own_thread(os.close, fd)

    # --- blockdev-reopen ----------------------------------------------------------
    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """A change of read-only or cache.direct opens a new description of
        the same file (through /proc/self/fd: the path may be covered by an
        export's mount by now); commit moves the OFD locks to it and puts it
        under the node's descriptor number (dup2), so extents and exports
        that hold the number keep working."""
        direct = options["cache"]["direct"]
        no_flush = options["cache"]["no-flush"]
        unmap = options["discard"] == "unmap"
        new_fd = -1
        if (read_only != self.read_only or direct != self.direct) and self.fd >= 0:
            flags = os.O_CLOEXEC | (os.O_DIRECT if direct else 0) | (os.O_RDONLY if read_only else os.O_RDWR)
            try:
                new_fd = await in_own_thread(os.open, f"/proc/self/fd/{self.fd}", flags)
            except OSError as e:
                raise BlockError(f"Could not reopen file: {os.strerror(e.errno or 0)}") from None

        async def commit() -> None:
            if new_fd >= 0:
                await in_own_thread(self._take_over_fd, new_fd)
                self.direct = direct
                self.request_alignment = DIRECT_ALIGNMENT if direct else 1
                if direct:
                    self._inline = self._nowait_reads = False
            self._no_flush = no_flush
            self.discard_unmap = unmap

        async def abort() -> None:
            if new_fd >= 0:
                await in_own_thread(os.close, new_fd)

        return commit, abort

    def _take_over_fd(self, new_fd: int) -> None:
        """Make `new_fd`'s description the node's, under the same number,
        with the locks the node holds now (in a thread: the old description's
        close may wait on a FUSE mount)."""
        old = self._lock
        if old is not None:
            moved = ImageLock(new_fd, old.filename)
            moved._set(old.perm, old.unshared)  # already checked: ours, moved
            old.release()  # the old description may live on (FUSE passthrough)
        os.dup2(new_fd, self.fd, inheritable=False)
        os.close(new_fd)
        if old is not None:
            moved.fd = self.fd
            self._lock = moved

    # --- permissions -> image locks -----------------------------------------
    def apply_permissions(self, perm: Perm, shared: Perm) -> None:
        if self._lock is None:
            return
        if self.force_share:
            shared = Perm.ALL
        self._lock.change(perm, shared)

    def lock_holders(self) -> dict[str, list[str]]:
        """What other processes hold on this image (for diagnostics and tests)."""
        return self._lock.holders() if self._lock else {"used": [], "unshared": []}

    # --- introspection --------------------------------------------------------
    def filename(self) -> str:
        return self._filename

    def host_fd(self) -> int | str:
        if self.direct:
            return "the node has no plain host descriptor (cache.direct=on)"
        return self.fd if self.fd >= 0 else "the node is closed"

    def getlength(self) -> int:
        return self._size

    def refresh_length(self) -> int:
        """Re-read the size from the descriptor, after someone else (the kernel
        under FUSE passthrough, a process sharing resize) changed it."""
        if self.fd >= 0:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                self._size = st.st_size
        return self._size

    async def allocated_size(self) -> int:
        if self._local_fs:
            return os.fstat(self.fd).st_blocks * 512
        return (await in_io_thread(os.fstat, self.fd)).st_blocks * 512

    # --- reads ------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if length <= 0:
            return b""
        if self.direct:
            return await in_io_thread(self._read_direct, offset, length)
        if self._inline and not in_background():
            return self._read_inline(offset, length)
        buf = bytearray(length)
        done = 0
        if self._nowait_reads and not in_background():
            try:
                done = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait_reads = False  # file system without RWF_NOWAIT
            if done == length:
                return buf
        await in_io_thread(self._pread_into, buf, done, offset + done)
        return buf

    def _read_inline(self, offset: int, length: int) -> bytes | bytearray:
        # pread allocates without zero-filling first: ~2x faster for 4 KiB
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        buf[: len(data)] = data
        self._pread_into(buf, len(data), offset + len(data))
        return buf

    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        """The file's own bytes (past the end: zeroes). Page-cache reads of a
        disk-backed file are tried without blocking by the caller; writes
        go inline only where they never wait (tmpfs) and stay inside the file."""
        if self.direct:
            return None
        if write:
            self._check_writable()
            if not self._inline or offset + length > self._size:
                return None
            return [(self.fd, offset, length, True)]
        if not self._inline and not self._nowait_reads:
            return None  # x-io-policy=threads, or no RWF_NOWAIT here
        size = self._size
        if offset + length <= size:
            return [(self.fd, offset, length, self._inline)]
        if offset >= size:
            return [zeroes(length)]
        n = size - offset
        return [(self.fd, offset, n, self._inline), zeroes(length - n)]

    def data_never_blocks(self) -> bool:
        return self._inline and not self.direct

    def _pread_into(self, buf: bytearray | memoryview, start: int, offset: int) -> None:
        """Fill buf[start:] from offset; what lies past EOF stays zero."""
        view = memoryview(buf)
        while start < len(view):
            n = os.preadv(self.fd, [view[start:]], offset)
            if n == 0:
                return
            start += n
            offset += n

    def _read_direct(self, offset: int, length: int) -> bytes:
        a = self.request_alignment
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        buf = aligned_buffer(end - start)
        try:
            self._pread_into(buf, 0, start)  # type: ignore[arg-type]
            return buf[offset - start : offset - start + length]
        finally:
            buf.close()

    # --- writes -----------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only or self.fd < 0:
            raise OSError(errno.EROFS if self.read_only else errno.EBADF, "node is read-only")

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self._check_writable()
        length = len(data)
        if length == 0:
            return
        flags = os.RWF_DSYNC if fua and not self._no_flush else 0
        if self.direct:
            await self._write_direct(offset, data, flags)
        elif self._inline and not in_background():
            self._pwrite_all(data, offset, flags)
        else:
            inline_ok = self._nowait_writes and not flags and not in_background()
            done = self._try_pwrite_nowait(data, offset) if inline_ok else 0
            if done < length:
                await in_io_thread(self._pwrite_all, memoryview(data)[done:], offset + done, flags)
        if offset + length > self._size:
            self._size = offset + length

    def _try_pwrite_nowait(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """A buffered write that would not block, inline (file systems that
        take RWF_NOWAIT for buffered writes: xfs, btrfs; ext4 refuses it)."""
        try:
            return os.pwritev(self.fd, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_writes = False
            return 0

    def _pwrite_all(self, data: bytes | bytearray | memoryview | Any, offset: int, flags: int = 0) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwritev(self.fd, [view], offset, flags)
            view = view[n:]
            offset += n

    async def _write_direct(self, offset: int, data: bytes | bytearray | memoryview, flags: int) -> None:
        a = self.request_alignment
        length = len(data)
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        partial = start != offset or end != offset + length
        async with self._ranges.hold(start, end, exclusive=partial):
            await in_io_thread(self._write_direct_sync, offset, data, start, end, partial, flags)

    def _write_direct_sync(self, offset: int, data: Any, start: int, end: int,
                           partial: bool, flags: int) -> None:
        buf = aligned_buffer(end - start)
        try:
            size_before = self._size
            if partial:  # read-modify-write of the partial head and tail blocks
                a = self.request_alignment
                self._pread_into(memoryview(buf)[:a], 0, start)  # type: ignore[arg-type]
                if end - a > start:
                    self._pread_into(memoryview(buf)[end - start - a :], 0, end - a)  # type: ignore[arg-type]
            buf[offset - start : offset - start + len(data)] = data
            self._pwrite_all(buf, start, flags)
            want = max(size_before, offset + len(data))
            if end > want and stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.ftruncate(self.fd, want)  # the padding must not grow the file
        finally:
            buf.close()

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_writable()
        if length <= 0:
            return
        await self._run(self._write_zeroes_sync, offset, length, may_unmap)
        if offset + length > self._size:
            self._size = offset + length

    def _write_zeroes_sync(self, offset: int, length: int, may_unmap: bool) -> None:
        end = offset + length
        size = self._size
        try:
            if may_unmap and self.discard_unmap and offset < size:
                # a punched hole reads as zeroes and frees the space
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, min(end, size) - offset)
                if end > size:
                    os.ftruncate(self.fd, end)
                return
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        self._write_zero_bytes(offset, end)

    def _write_zero_bytes(self, offset: int, end: int) -> None:
        if self.direct:
            zeros: Any = aligned_buffer(ZERO_CHUNK)
        else:
            zeros = bytes(ZERO_CHUNK)
        try:
            while offset < end:
                n = min(ZERO_CHUNK, end - offset)
                if self.direct and (offset % self.request_alignment or n % self.request_alignment):
                    raise OSError(errno.EINVAL, "unaligned zero write with O_DIRECT")
                self._pwrite_all(memoryview(zeros)[:n], offset)
                offset += n
        finally:
            if self.direct:
                zeros.close()

    async def discard(self, offset: int, length: int) -> None:
        if not self.discard_unmap or self.read_only or length <= 0:
            return
        end = min(offset + length, self._size)
        if end <= offset:
            return
        try:
            await self._run(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    async def flush(self) -> None:
        if self._no_flush or self.fd < 0:
            return
        await self._run(os.fdatasync, self.fd)

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        self._check_writable()
        self.check_resize_allowed()
        prealloc = Prealloc(prealloc)
        if prealloc == Prealloc.METADATA:
            raise OSError(errno.ENOTSUP, "Unsupported preallocation mode: metadata")
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        await self._run(self._truncate_sync, size, prealloc)
        self._size = size

    def _truncate_sync(self, size: int, prealloc: Prealloc) -> None:
        old = os.fstat(self.fd).st_size
        os.ftruncate(self.fd, size)
        if size <= old or prealloc == Prealloc.OFF:
            return
        try:
            if prealloc == Prealloc.FALLOC:
                fallocate(self.fd, 0, old, size - old)
            else:  # full: really write the zeroes
                self._write_zero_bytes_aligned(old, size)
                os.fdatasync(self.fd)
        except BaseException:
            os.ftruncate(self.fd, old)
            raise

    def _write_zero_bytes_aligned(self, start: int, end: int) -> None:
        if not self.direct:
            self._write_zero_bytes(start, end)
            return
        a = self.request_alignment
        head = start - start % a
        if head != start:  # keep the existing bytes of the first partial block
            block = self._read_direct(head, a)
            buf = aligned_buffer(a)
            try:
                buf[: start - head] = block[: start - head]
                self._pwrite_all(buf, head)
            finally:
                buf.close()
        aligned_end = -(-end // a) * a
        self._write_zero_bytes(head + (a if head != start else 0), aligned_end)
        os.ftruncate(self.fd, end)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._inline and not in_background():
            return fn(*args)
        return await in_io_thread(fn, *args)

    # --- block status -------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> BlockStatus:
        size = self._size
        if offset >= size:
            return BlockStatus(Status.ZERO | Status.EOF, max(length, 1))
        n = min(length, size - offset)
        # always off the loop: SEEK_HOLE walks the file's pages (3-4 ms past
        # 384 MiB of data on tmpfs), which would stall every other request
        st, count = await in_io_thread(self._seek_status, offset, n)
        if offset + count >= size:
            st |= Status.EOF
        return BlockStatus(st | Status.ALLOCATED, count)

    def _seek_status(self, offset: int, n: int) -> tuple[Status, int]:
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here to EOF
                return Status.ZERO, n
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                return Status.DATA, n
            raise
        if data > offset:
            return Status.ZERO, min(n, data - offset)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:  # file shrank under us
                return Status.DATA, n
            raise
        return Status.DATA, max(1, min(n, hole - offset))


@register_driver
class HostDeviceNode(FileNode):
    driver = "host_device"

    @classmethod
    def create_steps(cls, graph: Any, options: dict[str, Any]) -> tuple[Any, Any] | None:
        return None  # devices are not created

    @classmethod
    def _check_type(cls, filename: str, fd: int, st: os.stat_result) -> int:
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise BlockError(f"'host_device' driver requires '{filename}' to be either a character or block device")
        return blockdev_size(fd)

    def host_fd(self) -> int | str:
        return "passthrough needs a raw export of a plain file (node is 'host_device')"

    async def allocated_size(self) -> int:
        return -1

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        self.check_resize_allowed()
        if Prealloc(prealloc) != Prealloc.OFF:
            raise OSError(errno.ENOTSUP, "Preallocation mode is not supported for device files")
        if size > self._size:
            raise OSError(errno.EINVAL, "Cannot grow device files")
        if exact and size != self._size:
            raise OSError(errno.ENOTSUP, "Cannot resize device files")

    def _write_zeroes_sync(self, offset: int, length: int, may_unmap: bool) -> None:
        # block devices take fallocate only with KEEP_SIZE
        mode = FALLOC_FL_KEEP_SIZE | (
            FALLOC_FL_PUNCH_HOLE if may_unmap and self.discard_unmap else FALLOC_FL_ZERO_RANGE
        )
        try:
            fallocate(self.fd, mode, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        self._write_zero_bytes(offset, offset + length)
