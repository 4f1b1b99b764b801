"""Request decoding, reply encoding and the session's answer to malformed input."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from exportd.fuse import abi, replies, requests
from exportd.fuse.filesystem import Attr, OpenReply
from tests.support.fuse import child, serving
from tests.support.toyfs import MemoryFS


def request(opcode: int, body: bytes, unique: int = 7, length: int | None = None) -> memoryview:
    n = abi.IN_HEADER.size + len(body)
    head = abi.IN_HEADER.pack(length if length is not None else n, opcode, unique, 1, 0, 0, 0, 0, 0)
    return memoryview(bytearray(head + body))


def test_header_checks():
    buf = request(abi.GETATTR, bytes(16))
    assert requests.header(buf, len(buf)) == (abi.GETATTR, 7, 1, 40)
    with pytest.raises(requests.ProtocolError, match="short read"):
        requests.header(buf, 39)
    bad = request(abi.GETATTR, bytes(16), length=100)
    with pytest.raises(requests.ProtocolError, match="header length 100"):
        requests.header(bad, len(bad))


def test_init_in_old_and_new_kernels():
    old = request(abi.INIT, struct.pack("<IIII", 7, 31, 131072, abi.ASYNC_READ | abi.INIT_EXT))
    init = requests.init_in(old, 40, len(old))  # 16-byte init_in: flags2 absent
    assert (init.major, init.minor, init.max_readahead, init.flags) == (
        7,
        31,
        131072,
        abi.ASYNC_READ | abi.INIT_EXT,
    )
    new = request(abi.INIT, abi.INIT_IN.pack(7, 45, 131072, abi.INIT_EXT | abi.MAX_PAGES, 1 << 5))
    init = requests.init_in(new, 40, len(new))
    assert init.flags & abi.PASSTHROUGH and init.flags & abi.MAX_PAGES
    with pytest.raises(requests.RequestError):
        requests.init_in(request(abi.INIT, bytes(8)), 40, 48)


def test_init_out_size_follows_kernel_minor():
    kw = dict(
        max_readahead=0,
        flags=abi.PASSTHROUGH | abi.ASYNC_READ,
        max_background=1,
        congestion_threshold=1,
        max_write=1 << 20,
        max_pages=256,
        max_stack_depth=2,
    )
    assert len(replies.init_out(minor=45, **kw)) == 64
    assert len(replies.init_out(minor=22, **kw)) == 24
    out = abi.INIT_OUT.unpack(replies.init_out(minor=45, **kw))
    assert out[3] == abi.ASYNC_READ and out[10] == abi.PASSTHROUGH >> 32 and out[11] == 2
    assert out[6] == 1 << 20 and out[8] == 256


def test_write_and_setattr_decoding():
    body = abi.WRITE_IN.pack(3, 4096, 5, abi.WRITE_KILL_SUIDGID, 0, 0, 0) + b"hello"
    buf = request(abi.WRITE, body)
    fh, off, data, write_flags = requests.write_in(buf, 40, len(buf))
    assert (fh, off, bytes(data), write_flags) == (3, 4096, b"hello", abi.WRITE_KILL_SUIDGID)
    short = request(abi.WRITE, abi.WRITE_IN.pack(3, 4096, 9, 0, 0, 0, 0) + b"hello")
    with pytest.raises(requests.RequestError, match="size 9"):
        requests.write_in(short, 40, len(short))
    valid = abi.FATTR_SIZE | abi.FATTR_MODE | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_FH
    valid |= abi.FATTR_KILL_SUIDGID
    sa = abi.SETATTR_IN.pack(valid, 0, 9, 123, 0, 5, 6, 0, 7, 8, 0, 0o100600, 0, 0, 0, 0)
    ch = requests.setattr_in(request(abi.SETATTR, sa), 40, 40 + len(sa), now_ns=42)
    assert ch.kill_setid
    assert (ch.size, ch.mode, ch.atime_ns, ch.mtime_ns, ch.fh, ch.uid) == (
        123,
        0o100600,
        42,
        6_000_000_008,
        9,
        None,
    )


def test_reply_encoding():
    a = abi.ATTR_OUT.unpack(
        replies.attr(Attr(size=10, mode=0o600, mtime_ns=3_000_000_005, valid_s=1.5))
    )
    assert a[0:2] == (1, 500_000_000)
    assert a[4] == 10 and a[5] == 1 and a[7] == 3 and a[10] == 5 and a[12] == 0o100600
    o = abi.OPEN_OUT.unpack(
        replies.open_out(OpenReply(fh=5, flags=abi.FOPEN_KEEP_CACHE, backing_id=3))
    )
    assert o == (
        5,
        abi.FOPEN_PASSTHROUGH,
        3,
    )  # KEEP_CACHE dropped: the kernel refuses it with passthrough
    o = abi.OPEN_OUT.unpack(replies.open_out(OpenReply(fh=5, flags=abi.FOPEN_DIRECT_IO)))
    assert o == (5, abi.FOPEN_DIRECT_IO, 0)


async def test_truncated_request_gets_einval_and_session_keeps_serving(target, caplog):
    async with serving(MemoryFS(4096), target) as session:
        # A READ whose body is too short, as if the kernel sent garbage.
        buf = request(abi.READ, bytes(10), unique=0xDEAD)
        with caplog.at_level(logging.WARNING):
            assert session.channel._dispatch(buf, len(buf)) is False
        assert "READ: body of 10 bytes" in caplog.text
        assert await child("out(os.stat(sys.argv[1]).st_size)", target) == 4096
        assert not session.closed.done()


async def test_inconsistent_header_halts_the_session(target, caplog):
    fs = MemoryFS(4096)
    async with serving(fs, target) as session:
        buf = request(abi.GETATTR, bytes(16), length=999)
        with caplog.at_level(logging.ERROR):
            session.channel._dispatch(buf, len(buf))
        reason = await asyncio.wait_for(session.closed, 10)
    assert reason.startswith("error: header length 999")
    assert fs.ended == reason
    assert "halting FUSE session" in caplog.text
