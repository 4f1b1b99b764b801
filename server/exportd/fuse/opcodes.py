"""The opcode table: how each FUSE request is decoded, handled and answered.

Ordinary requests are one row each in OPS:

    abi.LSEEK: Op(requests.lseek_in, _lseek, replies.lseek_out, interruptible=True)

the decoder (requests.py) turns the request body into a request value, the
handler (here) calls the file system with it and returns its coroutine, which
the channel starts eagerly, and the encoder (replies.py) turns the result into
the reply payload: encode(result, request). `interruptible` rows change
nothing, so an INTERRUPT may cancel them (channel.interrupt).

Requests that answer themselves are in SPECIAL, as handlers
(channel, unique, buf, off, end) -> bool: the handshake (INIT, DESTROY,
INTERRUPT, FORGET) and the data path (READ: readreply.py; WRITE: write_now,
or write() on a copy of small payloads).

The channel looks handlers up in a list indexed by opcode: BEFORE_INIT until
INIT is answered (every other known request gets EIO), SERVING afterwards;
unknown opcodes get ENOSYS.

Adding an opcode: its constant in abi.py, a decoder in requests.py, an
encoder in replies.py, a handler and a row here (and the SingleFileFS method
the handler calls, in filesystem.py).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from . import abi, replies, requests
from .channel import MAX_WRITE, PAGE_SIZE, Channel, Encoder, Handler
from .filesystem import SetAttr, SingleFileFS
from .readreply import answer_read

log = logging.getLogger(__name__)

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


class Op(NamedTuple):
    """One ordinary opcode (see the module docstring)."""

    decode: Callable[[memoryview, int, int], Any]
    handle: Callable[[SingleFileFS, Any], Coroutine[Any, Any, Any]]
    encode: Encoder
    interruptible: bool = False


# --- handlers of ordinary requests: (fs, request) -> coroutine ---------------------


def _getattr(fs: SingleFileFS, _request: None) -> Coroutine[Any, Any, Any]:
    return fs.getattr()


def _setattr(fs: SingleFileFS, changes: SetAttr) -> Coroutine[Any, Any, Any]:
    if changes.kill_setid:
        fs.kill_setid()  # an unprivileged truncate
    return fs.setattr(changes)


def _open(fs: SingleFileFS, request: tuple[int, int]) -> Coroutine[Any, Any, Any]:
    flags, open_flags = request
    if open_flags & abi.OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
        fs.kill_setid()
    return fs.open(flags)


def _statfs(fs: SingleFileFS, _request: None) -> Coroutine[Any, Any, Any]:
    return fs.statfs()


def _release(fs: SingleFileFS, request: tuple[int, int]) -> Coroutine[Any, Any, Any]:
    return fs.release(*request)


def _flush(fs: SingleFileFS, fh: int) -> Coroutine[Any, Any, Any]:
    return fs.flush(fh)


def _fsync(fs: SingleFileFS, request: tuple[int, bool]) -> Coroutine[Any, Any, Any]:
    return fs.fsync(*request)


def _fallocate(fs: SingleFileFS, request: tuple[int, int, int, int]) -> Coroutine[Any, Any, Any]:
    return fs.fallocate(*request)


def _lseek(fs: SingleFileFS, request: tuple[int, int, int]) -> Coroutine[Any, Any, Any]:
    return fs.lseek(*request)


OPS: dict[int, Op] = {
    abi.GETATTR: Op(requests.nothing, _getattr, replies.attr, interruptible=True),
    abi.SETATTR: Op(requests.setattr_in, _setattr, replies.attr),
    abi.OPEN: Op(requests.open_in, _open, replies.open_out),
    abi.STATFS: Op(requests.nothing, _statfs, replies.statfs_out, interruptible=True),
    abi.RELEASE: Op(requests.release_in, _release, replies.nothing),
    abi.FLUSH: Op(requests.flush_in, _flush, replies.nothing),
    abi.FSYNC: Op(requests.fsync_in, _fsync, replies.nothing),
    abi.FALLOCATE: Op(requests.fallocate_in, _fallocate, replies.nothing),
    abi.LSEEK: Op(requests.lseek_in, _lseek, replies.lseek_out, interruptible=True),
}


def _ordinary(op: Op) -> Handler:
    """The channel handler of one OPS row (made once, at import)."""
    decode, handle, encode, interruptible = op

    def answer(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
        request = decode(buf, off, end)
        return ch.start(unique, handle(ch.fs, request), encode, request, None, interruptible)

    return answer


# --- the data path ---------------------------------------------------------------


def _write(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    fh, offset, data, write_flags = requests.write_in(buf, off, end)
    fs = ch.fs
    if write_flags & abi.WRITE_KILL_SUIDGID:
        fs.kill_setid()
    size = len(data)
    write_now = ch.write_now
    if write_now is not None:
        # answered at once, straight from the receive buffer (no copy)
        try:
            count = write_now(fh, offset, data)
            if count is not None:
                ch.reply_ok(unique, replies.written(count, size))
                return False
        except BaseException as exc:  # noqa: B036 - every failure becomes an errno
            ch.reply_exception(unique, exc)
            return False
    if size <= COPY_WRITE_MAX:
        coro = fs.write(fh, offset, memoryview(bytes(data)))
        return ch.start(unique, coro, replies.written, size, None, False)
    return ch.start(unique, fs.write(fh, offset, data), replies.written, size, buf, False)


# --- the handshake ---------------------------------------------------------------


def _init(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    init = requests.init_in(buf, off, end)
    owner = ch.owner
    if init.major > abi.KERNEL_VERSION:
        ch.reply_ok(unique, replies.init_major_only())  # the kernel retries with ours
        return False
    if init.major < abi.KERNEL_VERSION or init.minor < abi.MIN_KERNEL_MINOR:
        ch.reply_error(unique, errno.EPROTO)
        owner.halt(f"kernel FUSE protocol {init.major}.{init.minor} is too old")
        return False
    minor = min(init.minor, abi.KERNEL_MINOR_VERSION)
    flags = WANTED_FLAGS
    if owner.want_passthrough:
        flags |= abi.PASSTHROUGH
    if owner.want_io_uring:
        flags |= abi.OVER_IO_URING
    flags &= init.flags
    if not flags & abi.INIT_EXT:
        flags &= 0xFFFFFFFF
    payload = replies.init_out(
        minor=minor,
        max_readahead=init.max_readahead,
        flags=flags,
        max_background=64,
        congestion_threshold=48,
        max_write=MAX_WRITE,
        max_pages=MAX_WRITE // PAGE_SIZE,
        # 2 = FILESYSTEM_MAX_STACK_DEPTH: backing files may sit on overlayfs
        # (container roots); nothing stacks on a single-file mount anyway.
        max_stack_depth=2 if flags & abi.PASSTHROUGH else 0,
    )
    ch.reply_ok(unique, payload)
    log.debug("%s: INIT 7.%d flags %#x", owner.mountpoint, minor, flags)
    ch.handlers = SERVING
    owner.initialized(minor, flags)
    return False


def _destroy(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    ch.reply_ok(unique, None)
    ch.stop_reading()
    ch.owner.destroyed()
    return False


def _interrupt(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    ch.interrupt(requests.interrupt_in(buf, off, end))
    return False  # INTERRUPT gets no reply


def _forget(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    return False  # one inode that never goes away; FORGET gets no reply


def _lookup(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    ch.reply_error(unique, errno.ENOENT)  # the root is a file: nothing under it
    return False


_OPCODE = struct.Struct("<I")  # fuse_in_header.opcode, at offset 4


def _before_init(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    (opcode,) = _OPCODE.unpack_from(buf, 4)
    log.warning("%s: %s before INIT", ch.owner.mountpoint, abi.opcode_name(opcode))
    ch.reply_error(unique, errno.EIO)
    return False


SPECIAL: dict[int, Handler] = {
    abi.READ: answer_read,
    abi.WRITE: _write,
    abi.LOOKUP: _lookup,
    abi.INTERRUPT: _interrupt,
    abi.FORGET: _forget,
    abi.BATCH_FORGET: _forget,
    abi.INIT: _init,
    abi.DESTROY: _destroy,
}

# The channel's tables, indexed by opcode (None: ENOSYS).
SERVING: list[Handler | None] = [None] * (abi.MAX_OPCODE + 1)
for _opcode, _op in OPS.items():
    SERVING[_opcode] = _ordinary(_op)
for _opcode, _handler in SPECIAL.items():
    SERVING[_opcode] = _handler
BEFORE_INIT: list[Handler | None] = [None if h is None else _before_init for h in SERVING]
BEFORE_INIT[abi.INIT] = _init
