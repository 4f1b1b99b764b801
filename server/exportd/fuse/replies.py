"""Encoding of FUSE replies: the payload structs that follow fuse_out_header.

The opcode table (opcodes.py) calls its encoders as encode(result, request):
the handler's result and the request as its decoder returned it (READ's and
WRITE's replies depend on the size asked); encoders that need no request
ignore it. A payload is bytes, None (an empty reply) or a Scatter (several
buffers sent with one writev).
"""

from __future__ import annotations

import errno
import math
import stat
from typing import Any

from . import abi
from .filesystem import Attr, OpenReply, StatFs

_NS = 1_000_000_000
PASSTHROUGH_FLAGS_ALLOWED = (
    abi.FOPEN_PASSTHROUGH
    | abi.FOPEN_DIRECT_IO
    | abi.FOPEN_PARALLEL_DIRECT_WRITES
    | abi.FOPEN_NOFLUSH
)


def _split_seconds(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    frac, whole = math.modf(seconds)
    return int(whole), int(frac * _NS)


def attr(a: Attr, _request: object = None) -> bytes:
    """fuse_attr_out for the one file."""
    mode = a.mode
    if stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG
    blocks = a.blocks if a.blocks is not None else (a.size + 511) // 512
    valid_s, valid_ns = _split_seconds(a.valid_s)
    return abi.ATTR_OUT.pack(
        valid_s,
        valid_ns,
        0,
        abi.ROOT_ID,
        a.size,
        blocks,
        a.atime_ns // _NS,
        a.mtime_ns // _NS,
        a.ctime_ns // _NS,
        a.atime_ns % _NS,
        a.mtime_ns % _NS,
        a.ctime_ns % _NS,
        mode,
        a.nlink,
        a.uid,
        a.gid,
        0,
        a.blksize,
        0,
    )


def open_out(reply: OpenReply, _request: object = None) -> bytes:
    flags = reply.flags
    if reply.backing_id:
        # The kernel refuses (EIO on open) passthrough combined with page
        # cache users such as KEEP_CACHE; keep only the flags it accepts.
        flags = (flags & PASSTHROUGH_FLAGS_ALLOWED) | abi.FOPEN_PASSTHROUGH
    return abi.OPEN_OUT.pack(reply.fh, flags, reply.backing_id)


def write_out(size: int) -> bytes:
    return abi.WRITE_OUT.pack(size, 0)


def written(count: int, size: int) -> bytes:
    """WRITE's reply: `count` of the `size` bytes asked were written."""
    if not 0 <= count <= size:
        raise OSError(errno.EIO, f"write handler returned {count} for {size} bytes")
    return abi.WRITE_OUT.pack(count, 0)


def lseek_out(offset: int, _request: object = None) -> bytes:
    return abi.LSEEK_OUT.pack(offset)


def nothing(_result: object, _request: object = None) -> None:
    """An empty reply, whatever the handler returned."""
    return None


class Scatter:
    """A reply payload in several buffers, written with one writev (no join)."""

    __slots__ = ("parts", "length")

    def __init__(self, parts: list[Any], length: int) -> None:
        self.parts = parts
        self.length = length

    def __len__(self) -> int:
        return self.length


def read_out(data: Any, size: int) -> Any:
    """READ's reply from read()'s result (one bytes-like or a list of them),
    cut to the `size` bytes asked."""
    if type(data) is list:
        parts = []
        length = 0
        for part in data:
            n = len(part)
            if length + n > size:
                parts.append(memoryview(part)[: size - length])
                length = size
                break
            parts.append(part)
            length += n
        return Scatter(parts, length)
    if len(data) > size:
        data = memoryview(data)[:size]
    return data


def statfs_out(s: StatFs, _request: object = None) -> bytes:
    return abi.STATFS_OUT.pack(
        s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0
    )


def init_out(
    *,
    minor: int,
    max_readahead: int,
    flags: int,
    max_background: int,
    congestion_threshold: int,
    max_write: int,
    max_pages: int,
    max_stack_depth: int,
) -> bytes:
    """fuse_init_out, cut to the size the kernel's minor knows."""
    full = abi.INIT_OUT.pack(
        abi.KERNEL_VERSION,
        minor,
        max_readahead,
        flags & 0xFFFFFFFF,
        max_background,
        congestion_threshold,
        max_write,
        1,
        max_pages,
        0,
        flags >> 32,
        max_stack_depth,
        0,
    )
    if minor < 5:
        return full[: abi.INIT_OUT_COMPAT_SIZE]
    if minor < 23:
        return full[: abi.INIT_OUT_COMPAT_22_SIZE]
    return full


def init_major_only() -> bytes:
    """The INIT reply to a kernel whose major is newer than ours: only our
    major and minor (the first 8 bytes); the kernel retries INIT with them."""
    return abi.INIT_OUT.pack(
        abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
    )[: abi.INIT_OUT_COMPAT_SIZE]


def inval_inode(ino: int = abi.ROOT_ID, offset: int = 0, length: int = 0) -> bytes:
    """A whole FUSE_NOTIFY_INVAL_INODE message: the kernel drops the inode's
    cached attributes and its cached pages from `offset` on (`length` 0: to
    the end; a negative offset: attributes only)."""
    body = abi.NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length)
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), abi.NOTIFY_INVAL_INODE, 0) + body
