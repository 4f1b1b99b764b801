"""Decoding of FUSE requests read from /dev/fuse.

The channel reads one request per read(2) into a shared buffer; this module
turns the bytes after the 40-byte fuse_in_header into Python values. Every
decoder is called as decode(buf, off, end) (the body is buf[off:end]) and
returns what the opcode's handler takes (opcodes.py). Decoders raise
RequestError when the body is shorter than its opcode's struct (the channel
answers EINVAL and logs); they never read past the request.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from . import abi
from .filesystem import SetAttr


class RequestError(Exception):
    """A request whose body does not match its opcode (answered EINVAL)."""


class ProtocolError(Exception):
    """A read whose header cannot be trusted; the session halts."""


@dataclass(slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32 when INIT_EXT is set


def header(buf: memoryview, n: int) -> tuple[int, int, int, int]:
    """(opcode, unique, nodeid, body offset) of a request of n bytes read."""
    if n < abi.IN_HEADER.size:
        raise ProtocolError(f"short read of {n} bytes (header is {abi.IN_HEADER.size})")
    length, opcode, unique, nodeid, _uid, _gid, _pid, _extlen, _pad = abi.IN_HEADER.unpack_from(buf)
    if length != n:
        raise ProtocolError(f"header length {length} != {n} bytes read (opcode {opcode})")
    return opcode, unique, nodeid, abi.IN_HEADER.size


def body(st, buf: memoryview, off: int, end: int, what: str) -> tuple:
    if end - off < st.size:
        raise RequestError(f"{what}: body of {end - off} bytes, need {st.size}")
    return st.unpack_from(buf, off)


def init_in(buf: memoryview, off: int, end: int) -> InitIn:
    major, minor, max_readahead, flags = body(abi.INIT_IN_COMPAT, buf, off, end, "INIT")
    if flags & abi.INIT_EXT and end - off >= abi.INIT_IN.size:
        flags2 = abi.INIT_IN.unpack_from(buf, off)[4]
        flags |= flags2 << 32
    return InitIn(major, minor, max_readahead, flags)


def setattr_in(buf: memoryview, off: int, end: int, now_ns: int | None = None) -> SetAttr:
    """The changes asked; times asked as "now" become `now_ns` (default: now)."""
    if now_ns is None:
        now_ns = time.time_ns()
    (
        valid,
        _pad,
        fh,
        size,
        _lock_owner,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode,
        _u4,
        uid,
        gid,
        _u5,
    ) = body(abi.SETATTR_IN, buf, off, end, "SETATTR")
    changes = SetAttr()
    if valid & abi.FATTR_SIZE:
        changes.size = size
    if valid & abi.FATTR_MODE:
        changes.mode = mode
    if valid & abi.FATTR_UID:
        changes.uid = uid
    if valid & abi.FATTR_GID:
        changes.gid = gid
    if valid & abi.FATTR_ATIME_NOW:
        changes.atime_ns = now_ns
    elif valid & abi.FATTR_ATIME:
        changes.atime_ns = atime * 1_000_000_000 + atimensec
    if valid & abi.FATTR_MTIME_NOW:
        changes.mtime_ns = now_ns
    elif valid & abi.FATTR_MTIME:
        changes.mtime_ns = mtime * 1_000_000_000 + mtimensec
    if valid & abi.FATTR_CTIME:
        changes.ctime_ns = ctime * 1_000_000_000 + ctimensec
    if valid & abi.FATTR_FH:
        changes.fh = fh
    if valid & abi.FATTR_KILL_SUIDGID:
        changes.kill_setid = True
    return changes


def write_in(buf: memoryview, off: int, end: int) -> tuple[int, int, memoryview, int]:
    """(fh, offset, data, write_flags) of a WRITE; data is a view into buf."""
    fh, offset, size, write_flags, _lock_owner, _flags, _pad = body(
        abi.WRITE_IN, buf, off, end, "WRITE"
    )
    start = off + abi.WRITE_IN.size
    if end - start != size:
        raise RequestError(f"WRITE: size {size} but {end - start} data bytes")
    return fh, offset, buf[start:end], write_flags


def nothing(buf: memoryview, off: int, end: int) -> None:
    """For requests whose body exportd does not need (GETATTR, STATFS)."""
    return None


READ_HEAD = struct.Struct("<QQI")  # fh, offset, size: the start of fuse_read_in
WRITE_HEAD = struct.Struct("<QQII")  # fh, offset, size, write_flags: the start of fuse_write_in


def read_in(buf: memoryview, off: int, end: int) -> tuple[int, int, int]:
    """(fh, offset, size) of a READ (inlined in readreply.answer_read)."""
    if end - off < abi.READ_IN.size:
        raise RequestError(f"READ: body of {end - off} bytes, need {abi.READ_IN.size}")
    return READ_HEAD.unpack_from(buf, off)


def open_in(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    """(flags, open_flags) of an OPEN."""
    return body(abi.OPEN_IN, buf, off, end, "OPEN")


def release_in(buf: memoryview, off: int, end: int) -> tuple[int, int]:
    """(fh, flags) of a RELEASE."""
    fh, flags, _release_flags, _lock_owner = body(abi.RELEASE_IN, buf, off, end, "RELEASE")
    return fh, flags


def flush_in(buf: memoryview, off: int, end: int) -> int:
    """fh of a FLUSH."""
    return body(abi.FLUSH_IN, buf, off, end, "FLUSH")[0]


def fsync_in(buf: memoryview, off: int, end: int) -> tuple[int, bool]:
    """(fh, datasync) of an FSYNC."""
    fh, fsync_flags, _pad = body(abi.FSYNC_IN, buf, off, end, "FSYNC")
    return fh, bool(fsync_flags & abi.FSYNC_FDATASYNC)


def fallocate_in(buf: memoryview, off: int, end: int) -> tuple[int, int, int, int]:
    """(fh, offset, length, mode) of a FALLOCATE."""
    fh, offset, length, mode, _pad = body(abi.FALLOCATE_IN, buf, off, end, "FALLOCATE")
    return fh, offset, length, mode


def lseek_in(buf: memoryview, off: int, end: int) -> tuple[int, int, int]:
    """(fh, offset, whence) of an LSEEK."""
    fh, offset, whence, _pad = body(abi.LSEEK_IN, buf, off, end, "LSEEK")
    return fh, offset, whence


def interrupt_in(buf: memoryview, off: int, end: int) -> int:
    """The unique id of the request an INTERRUPT is about."""
    return body(abi.INTERRUPT_IN, buf, off, end, "INTERRUPT")[0]
