"""Protocol details, seen by python3-libnbd (system python) and by raw
sockets: structured reads with holes, block status, FUA, trim, zeroing with
FAST_ZERO, read-only refusals, and clients that misbehave."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from tests.nbd.tools import chain_images, nbdsh, qemu_img_create, run

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054


async def test_structured_read_sends_holes_and_block_status(nbd, workdir: Path) -> None:
    _, top = chain_images(workdir)
    await nbd.qcow2("top", top)
    await nbd.export("e0", "top", name="disk", **{"allocation-depth": True})
    result = await nbdsh("""
        chunks = []
        def chunk(buf, offset, status, err):
            chunks.append([offset, len(buf), status, bytes(buf).count(0) == len(buf), bytes(buf[:1]).hex()])
            return 0
        h.pread_structured(4 << 20, 0, chunk)
        ext = {}
        def cb(ctx, offset, entries, err):
            ext[ctx] = list(entries)
            return 0
        h.block_status(16 << 20, 0, cb)
        one = {}
        def cb1(ctx, offset, entries, err):
            one[ctx] = list(entries)
            return 0
        h.block_status(16 << 20, 0, cb1, nbd.CMD_FLAG_REQ_ONE)
        result = [chunks, ext, one, h.can_meta_context("qemu:allocation-depth")]
    """, nbd.uri("disk"))
    chunks, ext, one, depth_ok = result
    assert depth_ok
    # data 0..1M (0xaa), hole 1M..2M, data 2M..3M (0xbb), hole 3M..4M
    assert [(c[0], c[1], c[2]) for c in chunks] == [(0, 1 << 20, 1), (1 << 20, 1 << 20, 2),
                                                   (2 << 20, 1 << 20, 1), (3 << 20, 1 << 20, 2)]
    assert chunks[0][4] == "aa" and chunks[2][4] == "bb"
    base = ext["base:allocation"]
    assert base[:8] == [1 << 20, 0, 1 << 20, 3, 1 << 20, 0, 1 << 20, 3]
    assert sum(base[0::2]) == 16 << 20
    depth = ext["qemu:allocation-depth"]
    assert depth[:10] == [1 << 20, 2, 1 << 20, 0, 1 << 20, 1, 1 << 20, 0, 512 << 10, 1]
    assert one["base:allocation"] == [1 << 20, 0] and one["qemu:allocation-depth"] == [1 << 20, 2]


async def test_writes_fua_trim_zero_cache_flush(nbd, workdir: Path) -> None:
    img = workdir / "w.qcow2"
    qemu_img_create(img, "8M")
    await nbd.qcow2("w", img)
    await nbd.export("w", "w", writable=True)
    result = await nbdsh("""
        h.pwrite(b"\\x37" * 65536, 65536, nbd.CMD_FLAG_FUA)
        a = h.pread(65536, 65536) == b"\\x37" * 65536
        h.zero(4096, 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        b = h.pread(4096, 65536) == bytes(4096) and h.pread(4096, 69632) == b"\\x37" * 4096
        h.zero(65536, 1 << 20, nbd.CMD_FLAG_FUA)
        h.trim(65536, 2 << 20, nbd.CMD_FLAG_FUA)
        h.cache(1 << 20, 0)
        h.flush()
        try:
            h.pread(4096, (8 << 20) - 2048)
            past = None
        except nbd.Error as e:
            past = e.errnum
        result = [a, b, past, h.can_fast_zero(), h.can_trim(), h.can_fua(), h.can_multi_conn()]
    """, nbd.uri("w"))
    assert result == [True, True, 22, True, True, True, True]  # EINVAL past the end


async def test_read_only_refuses_writes_with_eperm(nbd, workdir: Path) -> None:
    img = workdir / "r.qcow2"
    qemu_img_create(img, "1M")
    await nbd.qcow2("r", img)
    await nbd.export("r", "r")
    result = await nbdsh("""
        h.set_strict_mode(0)
        errs = []
        for op in (lambda: h.pwrite(b"x", 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
            try:
                op()
                errs.append(0)
            except nbd.Error as e:
                errs.append(e.errnum)
        result = [h.is_read_only(), errs, h.pread(512, 0) == bytes(512)]
    """, nbd.uri("r"))
    assert result == [True, [1, 1, 1], True]


async def _handshake(sock: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    magic, opt, flags = struct.unpack(">QQH", await reader.readexactly(18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags == 3  # FIXED_NEWSTYLE | NO_ZEROES
    return reader, writer


async def _go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: bytes) -> None:
    writer.write(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    writer.write(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    while True:
        _, _, rtype, n = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(n)
        if rtype == 1:
            return
        assert rtype == 3, rtype


async def test_garbage_and_disconnects_affect_no_other_client(nbd, workdir: Path) -> None:
    img = workdir / "g.qcow2"
    qemu_img_create(img, "4M")
    await nbd.qcow2("g", img)
    await nbd.export("g", "g", writable=True)
    # garbage before and after the handshake; a write cut in the middle; a read then gone
    r1, w1 = await _handshake(nbd.sock)
    w1.write(b"\xff" * 100)
    r2, w2 = await _handshake(nbd.sock)
    await _go(r2, w2, b"g")
    w2.write(b"this is not a request at all....")
    r3, w3 = await _handshake(nbd.sock)
    await _go(r3, w3, b"g")
    w3.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"x" * 1000)
    await w3.drain()
    r4, w4 = await _handshake(nbd.sock)
    await _go(r4, w4, b"g")
    for i in range(8):
        w4.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 1 << 20))
    await w4.drain()
    for w in (w1, w3, w4):
        w.close()
    assert await r1.read() == b"" and await r2.read() == b""  # the server hung up on garbage
    # others work meanwhile and afterwards
    out = (await run("qemu-io", "-f", "raw", "-c", "write -P 9 0 64k", "-c", "read -P 9 0 64k",
                     nbd.uri("g"))).stdout
    assert "verification failed" not in out
    for _ in range(100):
        if (await nbd.d.cmd("query-block-exports"))[0]["clients"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await nbd.d.cmd("query-block-exports"))[0]["clients"] == 0  # nothing leaked
    await nbd.d.cmd("block-export-del", {"id": "g"})  # safe: no reference left behind
    assert await nbd.d.event("BLOCK_EXPORT_DELETED") == {"id": "g"}


async def test_option_replies(nbd, workdir: Path) -> None:
    """LIST, unknown options, meta contexts before structured replies, ABORT."""
    img = workdir / "o.qcow2"
    qemu_img_create(img, "1M")
    await nbd.qcow2("o", img)
    await nbd.export("o", "o", description="d")
    reader, writer = await _handshake(nbd.sock)
    writer.write(struct.pack(">I", 3))

    async def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII", await reader.readexactly(20))
            assert magic == 0x3E889045565A9 and o == opt
            replies.append((rtype, await reader.readexactly(n)))
            if rtype != 2 and rtype != 4:  # SERVER / META_CONTEXT come before ACK
                return replies

    assert await option(3) == [(2, struct.pack(">I", 1) + b"od"), (1, b"")]
    assert (await option(99))[0][0] == 0x80000001  # ERR_UNSUP
    q = struct.pack(">I", 1) + b"o" + struct.pack(">I", 0)
    assert (await option(9, q))[0][0] == 0x80000003  # ERR_INVALID: no structured replies yet
    assert await option(8) == [(1, b"")]
    assert (await option(8))[0][0] == 0x80000003  # twice
    assert await option(9, q) == [(4, struct.pack(">I", 0) + b"base:allocation"), (1, b"")]
    bad = struct.pack(">I", 4) + b"nope" + struct.pack(">I", 0)
    rt, msg = (await option(10, bad))[0]
    assert rt == 0x80000006 and msg == b"export 'nope' not present"
    assert await option(2) == [(1, b"")]
    assert await reader.read() == b""
    writer.close()


async def test_client_that_stops_reading_blocks_only_itself(nbd, workdir: Path) -> None:
    img = workdir / "s.raw"
    qemu_img_create(img, "64M", fmt="raw")
    await nbd.d.cmd("blockdev-add", {"driver": "file", "node-name": "s", "filename": str(img)})
    await nbd.export("s", "s", writable=True)
    r, w = await _handshake(nbd.sock)
    await _go(r, w, b"s")
    for i in range(32):  # 32 MiB of replies nobody reads (more than fits in the socket)
        w.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 1 << 20))
    await w.drain()
    await asyncio.sleep(0.5)
    out = (await run("qemu-io", "-f", "raw", "-c", "write -P 3 1M 1M", "-c", "read -P 3 1M 1M",
                     nbd.uri("s"), timeout=20)).stdout
    assert "verification failed" not in out and "read 1048576/1048576" in out
    w.close()
    for _ in range(100):
        if (await nbd.d.cmd("query-block-exports"))[0]["clients"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await nbd.d.cmd("query-block-exports"))[0]["clients"] == 0
