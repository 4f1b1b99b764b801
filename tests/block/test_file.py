"""The file driver against real files: odd offsets and lengths, zeroes and
discard seen by block_status, truncate, preallocation, O_DIRECT."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import pytest

from exportd.block.file import FileNode
from exportd.block.graph import BlockGraph
from exportd.block.node import Perm, Prealloc, Status
from exportd.errors import BlockError
from tests.support.images import make_pattern_image as make_image

MiB = 1 << 20


async def open_file(graph: BlockGraph, path: Path, **opts) -> FileNode:
    node = await graph.add({"driver": "file", "node-name": "f", "filename": str(path), **opts})
    assert isinstance(node, FileNode)
    return node


async def test_odd_offsets_and_lengths(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "a.img"
    model = make_image(path, MiB)
    f = await open_file(graph, path)
    assert f.getlength() == MiB
    rng = random.Random(4)
    for _ in range(60):
        off = rng.randrange(0, MiB - 1)
        n = rng.randrange(1, min(70000, MiB - off))
        if rng.random() < 0.5:
            data = rng.randbytes(n)
            await f.write(off, data, fua=rng.random() < 0.2)
            model[off : off + n] = data
        else:
            assert bytes(await f.read(off, n)) == bytes(model[off : off + n])
    await f.flush()
    assert path.read_bytes() == bytes(model)
    # a write past EOF grows the file; a read of what lies past EOF gives zeroes
    await f.write(MiB + 3, b"tail")
    assert f.getlength() == MiB + 7
    assert bytes(await f.read(MiB, 16)) == b"\0\0\0tail" + bytes(9)


async def test_concurrent_requests(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "c.img"
    model = make_image(path, 4 * MiB)
    f = await open_file(graph, path)
    rng = random.Random(9)
    writes = []
    for i in range(32):  # disjoint 4 KiB-ish blocks at odd offsets
        off = i * 131072 + 13
        data = rng.randbytes(5000)
        model[off : off + len(data)] = data
        writes.append(f.write(off, data))
    await asyncio.gather(*writes)
    reads = await asyncio.gather(*(f.read(i * 131072, 6000) for i in range(32)))
    for i, got in enumerate(reads):
        assert bytes(got) == bytes(model[i * 131072 : i * 131072 + 6000])


async def test_write_zeroes_and_discard_in_block_status(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "z.img"
    model = make_image(path, 2 * MiB)
    f = await open_file(graph, path, discard="unmap")
    st = await f.block_status(0, 2 * MiB)
    assert st.status & Status.DATA and st.length == 2 * MiB and st.status & Status.EOF

    await f.discard(MiB, 256 * 1024)  # punches a hole
    st = await f.block_status(MiB, MiB)
    assert st.status & Status.ZERO and not st.status & Status.DATA
    assert st.length == 256 * 1024
    assert bytes(await f.read(MiB, 256 * 1024)) == bytes(256 * 1024)
    st = await f.block_status(0, 2 * MiB)
    assert st.status & Status.DATA and st.length == MiB

    await f.write_zeroes(64 * 1024, 64 * 1024, may_unmap=True)  # unmap: a hole
    st = await f.block_status(64 * 1024, MiB)
    assert st.status & Status.ZERO and st.length == 64 * 1024
    await f.write_zeroes(4096 + 5, 3000)  # unaligned, no unmap: zeroes all the same
    assert bytes(await f.read(4096 + 5, 3000)) == bytes(3000)
    data = path.read_bytes()
    assert data[4096 + 5 : 4096 + 3005] == bytes(3000)
    assert data[4096 : 4096 + 5] == model[4096 : 4096 + 5]  # neighbours untouched
    assert data[4096 + 3005 : 4096 + 3010] == model[4096 + 3005 : 4096 + 3010]

    before = await f.allocated_size()
    await f.write_zeroes(2 * MiB, MiB)  # past EOF: grows
    assert f.getlength() == 3 * MiB and os.path.getsize(path) == 3 * MiB
    assert await f.allocated_size() <= before + MiB
    st = await f.block_status(2 * MiB, MiB)
    assert st.status & Status.EOF


async def test_discard_ignored_by_default(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "d.img"
    model = make_image(path, MiB)
    f = await open_file(graph, path)
    await f.discard(0, MiB)
    assert bytes(await f.read(0, MiB)) == bytes(model)
    st = await f.block_status(0, MiB)
    assert st.status & Status.DATA


async def test_truncate_grow_shrink_and_prealloc(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "t.img"
    model = make_image(path, MiB)
    f = await open_file(graph, path)
    await f.truncate(3 * MiB)
    assert f.getlength() == 3 * MiB == os.path.getsize(path)
    st = await f.block_status(MiB, 2 * MiB)
    assert st.status & Status.ZERO and st.length == 2 * MiB and st.status & Status.EOF
    assert bytes(await f.read(MiB - 4, 8)) == bytes(model[-4:]) + bytes(4)

    await f.truncate(MiB // 2 + 3)  # shrink to an odd size
    assert os.path.getsize(path) == MiB // 2 + 3
    assert path.read_bytes() == bytes(model[: MiB // 2 + 3])

    alloc = await f.allocated_size()
    await f.truncate(MiB // 2 + 3 + 4 * MiB, prealloc=Prealloc.FALLOC)
    assert await f.allocated_size() >= alloc + 4 * MiB - 4096
    assert bytes(await f.read(MiB, 4096)) == bytes(4096)

    alloc = await f.allocated_size()
    await f.truncate(12 * MiB, prealloc=Prealloc.FULL)
    assert await f.allocated_size() >= alloc + 7 * MiB
    st = await f.block_status(9 * MiB, MiB)
    assert st.status & Status.DATA  # really written
    assert bytes(await f.read(9 * MiB, 4096)) == bytes(4096)
    with pytest.raises(OSError):
        await f.truncate(MiB, prealloc=Prealloc.METADATA)


async def test_o_direct_unaligned(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    model = make_image(path, MiB + 1000)  # size not a multiple of the block size
    f = await open_file(graph, path, cache={"direct": True})
    assert f.direct and f.request_alignment >= 512
    assert os.O_DIRECT & __import__("fcntl").fcntl(f.fd, __import__("fcntl").F_GETFL)
    rng = random.Random(11)
    for _ in range(30):
        off = rng.randrange(0, MiB)
        n = rng.randrange(1, 20000)
        if rng.random() < 0.5:
            data = rng.randbytes(n)
            await f.write(off, data)
            model[off : off + n] = data
            model.extend(bytes(max(0, off + n - len(model))))
        else:
            assert bytes(await f.read(off, n)) == bytes(model[off : off + n]).ljust(n, b"\0")
    # a partial write at the unaligned end must not round the file size up
    await f.write(MiB + 990, b"0123456789")
    model[MiB + 990 : MiB + 1000] = b"0123456789"
    assert os.path.getsize(path) == len(model)
    # overlapping unaligned writes in flight at once stay consistent
    a, b = rng.randbytes(5000), rng.randbytes(5000)
    await asyncio.gather(f.write(10, a), f.write(2000, b), f.write(8192, a[:4096]))
    merged = bytearray(model)
    merged[10:5010] = a
    merged[2000:7000] = b
    merged[8192 : 8192 + 4096] = a[:4096]
    got = path.read_bytes()
    assert got[8192 : 8192 + 4096] == a[:4096]
    assert got[10:2000] == a[:1990] and got[5010:7000] == b[3010:]
    assert got[2000:5010] in (a[1990:], b[:3010])
    await f.write_zeroes(100, 333)
    assert path.read_bytes()[100:433] == bytes(333)


async def test_read_only_and_open_errors(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    make_image(path, 8192)
    f = await graph.add({"driver": "file", "node-name": "ro", "filename": str(path), "read-only": True})
    assert f.read_only
    with pytest.raises(OSError):
        await f.write(0, b"x")
    with pytest.raises(BlockError, match="read-only"):
        f.attach("exp", Perm.WRITE, Perm.ALL)
    missing = tmp_path / "missing.img"
    with pytest.raises(BlockError) as e:
        await graph.add({"driver": "file", "node-name": "m", "filename": str(missing)})
    assert e.value.desc == f"Could not open '{missing}': No such file or directory"
    with pytest.raises(BlockError) as e:
        await graph.add({"driver": "file", "node-name": "m", "filename": str(tmp_path)})
    assert e.value.desc == f"Could not open '{tmp_path}': Is a directory"
    with pytest.raises(BlockError, match="regular file"):
        await graph.add({"driver": "file", "node-name": "m", "filename": "/dev/null"})
    with pytest.raises(BlockError, match="block device"):
        await graph.add({"driver": "host_device", "node-name": "m", "filename": str(path)})
    with pytest.raises(BlockError, match="Parameter 'bogus' is unexpected"):
        await graph.add({"driver": "file", "node-name": "m", "filename": str(path), "bogus": 1})
    assert [n.node_name for n in graph.nodes()] == ["ro"]


async def test_auto_read_only(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "aro.img"
    make_image(path, 4096)
    # an immutable file refuses O_RDWR even to root (EPERM)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not possible here")
    try:
        with pytest.raises(BlockError, match="Could not open"):
            await graph.add({"driver": "file", "node-name": "a", "filename": str(path)})
        f = await graph.add({"driver": "file", "node-name": "a", "filename": str(path), "auto-read-only": True})
        assert f.read_only
        assert len(await f.read(0, 4096)) == 4096
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


async def test_descriptor_kept_after_rename(graph: BlockGraph, tmp_path: Path) -> None:
    """The node never goes back to the path (an export may cover it)."""
    path = tmp_path / "k.img"
    model = make_image(path, 65536)
    f = await open_file(graph, path)
    path.rename(tmp_path / "moved.img")
    path.write_bytes(b"other file")
    assert bytes(await f.read(0, 65536)) == bytes(model)
    await f.write(0, b"still")
    assert (tmp_path / "moved.img").read_bytes()[:5] == b"still"


async def test_io_policy_threads_matches_auto(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "p.img"
    model = make_image(path, MiB)
    f = await graph.add({"driver": "file", "node-name": "p", "filename": str(path), "x-io-policy": "threads"})
    assert not f._inline and not f._nowait_reads
    assert bytes(await f.read(12345, 54321)) == bytes(model[12345 : 12345 + 54321])
    auto = await graph.add({"driver": "file", "node-name": "q", "filename": str(path), "read-only": True})
    expect_inline = "shm" in str(imgdir)
    assert auto._inline == expect_inline and auto._nowait_reads != expect_inline
    assert bytes(await auto.read(12345, 54321)) == bytes(model[12345 : 12345 + 54321])


async def test_detect_zeroes(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "dz.img"
    model = make_image(path, MiB)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path),
                         "discard": "unmap", "detect-zeroes": "unmap"})
    await f.write(256 * 1024, bytes(256 * 1024))  # becomes a punched hole
    st = await f.block_status(256 * 1024, MiB)
    assert st.status & Status.ZERO and st.length == 256 * 1024
    await f.write(5, b"\0\0x\0")  # not all zero: written as is
    model[256 * 1024 : 512 * 1024] = bytes(256 * 1024)
    model[5:9] = b"\0\0x\0"
    assert path.read_bytes() == bytes(model)
    g = await graph.add({"driver": "file", "node-name": "g", "filename": str(path), "detect-zeroes": "on"})
    await g.write(600 * 1024, bytes(5000), fua=True)
    model[600 * 1024 : 600 * 1024 + 5000] = bytes(5000)
    assert path.read_bytes() == bytes(model)
    with pytest.raises(BlockError, match="detect-zeroes to unmap"):
        await graph.add({"driver": "file", "node-name": "h", "filename": str(path), "detect-zeroes": "unmap"})


async def test_aio_modes_accepted(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "aio.img"
    model = make_image(path, 65536)
    with pytest.raises(BlockError) as e:
        await graph.add({"driver": "file", "node-name": "a", "filename": str(path), "aio": "native"})
    assert e.value.desc == "aio=native was specified, but it requires cache.direct=on, which was not specified."
    a = await graph.add({"driver": "file", "node-name": "a", "filename": str(path), "aio": "native",
                         "cache": {"direct": True}})
    b = await graph.add({"driver": "file", "node-name": "b", "filename": str(path), "aio": "io_uring"})
    assert bytes(await a.read(3, 5000)) == bytes(await b.read(3, 5000)) == bytes(model[3:5003])
