"""How a READ is answered: the one place that picks splice, inline or await.

answer_read() is the READ opcode's handler. It asks the file system's
read_now(fh, offset, size) (filesystem.py) what the reply holds, and:

- None: starts read() (answered inline if it never waits, else from a task);
- a bytes-like object: sends it as it is (cut to `size`);
- a list of extents (exportd.extents):
  1. splices them (splice.py: one copy instead of two) when the read is big
     (>= SPLICE_MIN), the loop has a usable pipe, the session was mounted
     for splicing, and every extent is a host file that never blocks;
  2. else reads them inline: pread for extents that never block, the shared
     zero buffer for ZEROES, preadv with RWF_NOWAIT (a page-cache hit) for
     the others; one writev for all the parts, never joined;
  3. else (a page not in the cache, no RWF_NOWAIT, a read error) awaits
     read(), which knows how to wait and how to report errors.
  A host file shorter than a never-blocking extent reads as zeroes past its
  end: an extent promises `length` bytes.

This is the hot path of every export: no object is made per request beyond
the reply itself, and the common cases (bytes, one extent) take no detour.
"""

from __future__ import annotations

import os
from typing import Any

from exportd.aio.resume import Resume, start_eagerly
from exportd.extents import Extent

from . import abi, replies
from .channel import MAX_WRITE, OUT, Channel
from .requests import READ_HEAD, RequestError
from .splice import SPLICE_MIN

_READ_IN_SIZE = abi.READ_IN.size
# Zeroes for ZEROES extents and host files shorter than their extent: one
# shared buffer as big as the largest READ, sliced (never copied).
_ZEROES = memoryview(bytes(MAX_WRITE))
# writev takes at most IOV_MAX (1024) buffers; a reply with more is joined.
_MAX_PARTS = 1000


def answer_read(ch: Channel, unique: int, buf: memoryview, off: int, end: int) -> bool:
    """Answer one READ (see the module docstring). Never keeps `buf`."""
    # requests.read_in, inlined
    if end - off < _READ_IN_SIZE:
        raise RequestError(f"READ: body of {end - off} bytes, need {_READ_IN_SIZE}")
    fh, offset, size = READ_HEAD.unpack_from(buf, off)
    data = None
    read_now = ch.read_now
    if read_now is not None:
        try:
            data = read_now(fh, offset, size)
        except BaseException as exc:  # noqa: B036 - every failure becomes an errno
            ch.reply_exception(unique, exc)
            return False
        if type(data) is list:  # extents
            if _send_extents(ch, unique, data, size):
                return False
            data = None
    if data is None:
        try:
            data = start_eagerly(ch.fs.read(fh, offset, size))
        except BaseException as exc:  # noqa: B036 - every failure becomes an errno
            ch.reply_exception(unique, exc)
            return False
        if type(data) is Resume:
            ch.go_on(unique, data, replies.read_out, size, None, True)
            return False
        if type(data) is list:  # buffers, sent with one writev
            ch.reply_ok(unique, replies.read_out(data, size))
            return False
    # one bytes-like object: channel.reply_ok, inlined
    if len(data) > size:
        data = memoryview(data)[:size]
    ch.write((OUT.pack(16 + len(data), 0, unique), data))
    return False


def _send_extents(ch: Channel, unique: int, extents: list[Extent], size: int) -> bool:
    """Splice or read inline; False when that would wait (nothing sent)."""
    pipe = ch.splice
    if len(extents) == 1 and (pipe is None or size < SPLICE_MIN):
        # the common small read: one piece, no list of parts
        fd, offset, length, never_blocks = extents[0]
        if length > size:
            length = size
        if fd < 0:
            data: Any = _ZEROES[:length]
        elif never_blocks:
            try:
                data = os.pread(fd, length, offset)
            except OSError:
                return False
            if len(data) < length:
                data = None  # past the host file's end: the general path pads
        else:
            data = None
        if data is not None:
            ch.write((OUT.pack(16 + length, 0, unique), data))
            return True
    if pipe is not None and size >= SPLICE_MIN:
        total = 0
        for fd, _, length, never_blocks in extents:
            if fd < 0 or not never_blocks:
                break
            total += length
        else:
            if total <= size:
                fd = ch.fd
                if fd < 0:
                    return True  # the session ended: nobody to answer
                if pipe.fill(OUT.pack(16 + total, 0, unique), extents):
                    try:
                        pipe.send(fd, 16 + total)
                    except OSError as e:
                        ch.write_failed(e)
                        return True
                    ch.spliced += 1
                    return True
                # a host file shorter than its extent, or a failure: read inline
    parts = _read_inline(extents, size)
    if parts is None:
        return False
    length = 0
    for part in parts:
        length += len(part)
    if len(parts) > _MAX_PARTS:
        parts = [b"".join(parts)]
    ch.write((OUT.pack(16 + length, 0, unique), *parts))
    return True


def _read_inline(extents: list[Extent], size: int) -> list[Any] | None:
    """The extents' bytes (up to `size`) as buffers, read without waiting;
    None when some would wait or failed (read() then answers)."""
    parts: list[Any] = []
    left = size
    for fd, offset, length, never_blocks in extents:
        if length > left:
            length = left
        if length <= 0:
            break
        left -= length
        if fd < 0:
            _zeroes(parts, length)
        elif never_blocks:
            try:
                data = os.pread(fd, length, offset)  # allocates without zero-filling
            except OSError:
                return None
            parts.append(data)
            if len(data) < length:
                _zeroes(parts, length - len(data))  # past the host file's end
        else:
            data = bytearray(length)
            try:
                got = os.preadv(fd, (data,), offset, os.RWF_NOWAIT)
            except OSError:  # EAGAIN, EOPNOTSUPP (no RWF_NOWAIT), an error
                return None
            if got < length:  # partly cached, or the host file's end
                return None
            parts.append(data)
    return parts


def _zeroes(parts: list[Any], length: int) -> None:
    while length > 0:
        n = min(length, len(_ZEROES))
        parts.append(_ZEROES[:n])
        length -= n
