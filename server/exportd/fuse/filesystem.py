"""The single-file filesystem interface the FUSE session serves.

A FUSE mount made by exportd.fuse has exactly one inode: the root, which is a
regular file (mounted over an existing regular file, as QEMU does). The
session decodes kernel requests and calls one `SingleFileFS` object:

    class MyFile(SingleFileFS):
        async def getattr(self) -> Attr: ...
        async def read(self, fh, offset, size) -> bytes | memoryview: ...
        ...

    session = await FuseSession.start(MyFile(), "/path/to/file",
                                      fsname="exportd:my-export",
                                      read_only=False, allow_other=False,
                                      passthrough=False)
    ...
    await session.close()          # unmount, idempotent

Contract (stable; other modules code against it):

- Every method is a coroutine run on the session's asyncio loop; many run at
  once (a slow read must not stall a getattr). Each request is its own task;
  an INTERRUPT from the kernel cancels it (CancelledError), and the session
  replies EINTR. Handlers must not make syscalls on the mount itself.
- Errors: raise OSError(errno, ...). The errno goes back to the kernel. Any
  other exception is logged and answered with EIO; the session keeps serving.
- `fh` is the value your `open()` put in OpenReply.fh; it comes back in read,
  write, flush, fsync, release, fallocate, lseek (and setattr when the kernel
  knows it).
- `write(fh, offset, data)`: `data` is a memoryview into a receive buffer the
  session shares with other sessions. It is valid until write() returns
  (even across awaits); copy it (bytes(data)) if you keep it longer.
- `read()` may return fewer bytes than asked only at end of file. It may
  return one bytes-like object or a list of them (sent with one writev,
  never joined); anything beyond `size` is cut off.
- `read_now(fh, offset, size)` is read()'s synchronous shortcut, called on
  the loop for every READ before read() (it must never block): a ReadResult
  when it can say at once what the reply holds, None for "await read()" (the
  default). A ReadResult is a bytes-like object, or a list of extents
  (exportd.extents: host file ranges and zeroes, covering the reply in
  order), which the session sends without copying them through Python where
  it can (splice, preadv; fuse/readreply.py). Errors: raise OSError(errno).
- `write_now(fh, offset, data)` is write()'s: the count written, or None
  (the default) for "await write()", having done nothing. `data` as for
  write(), valid only until it returns.
- `splice_reads = True` asks for a mount whose READs fit the splice pipe
  (max_read of 1020 KiB: fuse/splice.py), for file systems whose read_now
  returns extents of files that never block (tmpfs).
- open(): flags are the open(2) flags (O_ACCMODE, O_TRUNC, O_APPEND, O_DIRECT,
  O_SYNC...). The session negotiates FUSE_ATOMIC_O_TRUNC, so an
  open(O_TRUNC) is NOT preceded by setattr(size=0): the handler truncates.
  Return OpenReply(fh, flags) with FOPEN_* bits (re-exported here):
  FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_PARALLEL_DIRECT_WRITES,
  FOPEN_NONSEEKABLE... For passthrough set backing_id to an id from
  `session.open_backing(fd)`; the session adds FOPEN_PASSTHROUGH itself and
  drops flags the kernel refuses with passthrough (KEEP_CACHE and others
  besides DIRECT_IO, PARALLEL_DIRECT_WRITES, NOFLUSH).
- setattr(changes) gets a SetAttr whose fields are None when unchanged and
  returns the new Attr.
- fallocate(fh, offset, length, mode): mode bits are Linux's
  FALLOC_FL_KEEP_SIZE / PUNCH_HOLE / ZERO_RANGE (constants below).
- lseek(fh, offset, whence): only SEEK_DATA (3) and SEEK_HOLE (4) reach the
  handler (the kernel does SEEK_SET/CUR/END itself). Return the offset or
  raise OSError(ENXIO). Raising ENOSYS makes the kernel treat the whole file
  as data from then on.
- statfs() -> StatFs.
- on_session_end(reason) is a plain callback called exactly once when the
  session ends for any reason: "closed" (session.close()), "unmounted"
  (unmounted from outside: the device read gave ENODEV), "destroy" (kernel
  sent DESTROY), or "error: <text>" (protocol failure). `session.closed` is
  an asyncio future resolving to the same reason string.

Default implementations: flush/fsync/release do nothing, statfs returns a
plausible empty filesystem, fallocate/lseek/setattr raise ENOSYS/EOPNOTSUPP.
"""

from __future__ import annotations

import errno
import stat
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from exportd.extents import Extent

# FOPEN_* flags for OpenReply.flags, re-exported for handlers.
from exportd.fuse.abi import (  # noqa: F401  (re-exported for handlers)
    FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_NOFLUSH,
    FOPEN_NONSEEKABLE,
    FOPEN_PARALLEL_DIRECT_WRITES,
    FOPEN_PASSTHROUGH,
    FOPEN_STREAM,
)

# fallocate(2) mode bits.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

SEEK_DATA = 3
SEEK_HOLE = 4

Bytes = bytes | bytearray | memoryview
# What read_now() says a READ's reply holds (see the module docstring).
ReadResult = Bytes | list[Extent]


@dataclass(slots=True)
class Attr:
    """Attributes of the one file. Times in nanoseconds since the epoch."""

    size: int
    mode: int = stat.S_IFREG | 0o644  # S_IFREG is added if missing
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blocks: int | None = None  # 512-byte units; None = derived from size
    blksize: int = 4096
    nlink: int = 1
    # How long the kernel may cache these attributes (seconds).
    valid_s: float = 1.0

    @staticmethod
    def now_ns() -> int:
        return time.time_ns()


@dataclass(slots=True)
class SetAttr:
    """Changes asked by a SETATTR request; None means 'leave as is'."""

    size: int | None = None
    mode: int | None = None  # permission bits (the kernel sends the full mode)
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None  # already resolved when the caller asked for 'now'
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    fh: int | None = None  # the open file the change comes through, if known
    kill_setid: bool = False  # an unprivileged truncate: the session calls fs.kill_setid()


@dataclass(slots=True)
class OpenReply:
    fh: int = 0
    flags: int = 0  # FOPEN_* bits
    backing_id: int = 0  # from session.open_backing(); nonzero => passthrough


@dataclass(slots=True)
class StatFs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 1
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


def without_setid(mode: int) -> int:
    """`mode` as a write or chown by an unprivileged user leaves it: no
    set-user-ID bit, no set-group-ID bit when group-executable (otherwise
    that bit means mandatory locking, and stays)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


class RingIO(Protocol):
    """The data path a ring thread runs off the loop (ringthread.py). Both
    data calls run on a ring thread, concurrently with the loop and with
    each other; each either does the whole request or nothing (None: the
    request goes to the loop instead). The others run on the loop."""

    def read_into(self, view: memoryview, offset: int) -> int | None:
        """Fill view (the READ's size) from `offset`: the bytes read (short
        only at the end of the file), or None."""

    def write_from(self, data: memoryview, offset: int) -> int | None:
        """Write `data` at `offset`: its length, or None (nothing written,
        or nothing that the loop's write would not write again)."""

    def refresh(self) -> None:
        """A declined request reached the loop: look again at what the
        threads may do."""

    def close(self) -> None:
        """The ring is gone: no thread calls anymore."""


class SingleFileFS(ABC):
    """The handler of one single-file FUSE mount. See the module docstring."""

    # READs sized for the splice pipe (see the module docstring)
    splice_reads: bool = False

    @abstractmethod
    async def getattr(self) -> Attr: ...

    async def setattr(self, changes: SetAttr) -> Attr:
        raise OSError(errno.EPERM, "setattr not supported")

    @abstractmethod
    async def open(self, flags: int) -> OpenReply: ...

    @abstractmethod
    async def read(self, fh: int, offset: int, size: int) -> Bytes | list[Bytes]: ...

    def read_now(self, fh: int, offset: int, size: int) -> ReadResult | None:
        """The reply to a READ without waiting, or None: await read()."""
        return None

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        raise OSError(errno.EROFS, "read-only")

    def write_now(self, fh: int, offset: int, data: memoryview) -> int | None:
        """write() without waiting: the count written, or None (nothing
        done): await write()."""
        return None

    def ring_io(self) -> RingIO | None:
        """READ and WRITE that FUSE ring threads may answer themselves, off
        the loop (ringthread.py), or None (the default): every request is
        handed to the loop. Asked once, when the ring starts."""
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def release(self, fh: int, flags: int) -> None:
        return None

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "fallocate not supported")

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        raise OSError(errno.ENOSYS, "lseek not supported")

    async def statfs(self) -> StatFs:
        return StatFs()

    def kill_setid(self) -> None:
        """An unprivileged caller writes to or truncates the file: clear its
        set-id bits, as a local file system would. The session negotiates
        FUSE_HANDLE_KILLPRIV_V2, which leaves this to us (and a chown must do
        it too: see without_setid). File systems keeping `mode` get it here."""
        mode = getattr(self, "mode", None)
        if isinstance(mode, int):
            self.mode = without_setid(mode)

    def on_session_end(self, reason: str) -> None:
        """Called once when the session ends (see module docstring)."""
        return None
