"""The synchronous data path contract (BlockNode.map_now): extents that cover
the range in order and hold exactly the bytes read() returns; None where the
driver must wait; never a shortcut around a driver's own read()/write()."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from exportd.block.file import FileNode
from exportd.block.graph import BlockGraph
from exportd.block.node import BlockNode
from exportd.extents import LENGTH, ZEROES, total_length

SIZE = 256 * 1024 + 1000



def bytes_of(extents: list) -> bytes:  # noqa: ANN001
    out = bytearray()
    for fd, off, n, _ in extents:
        if fd == ZEROES:
            out += bytes(n)
        else:
            data = os.pread(fd, n, off)
            out += data + bytes(n - len(data))
    return bytes(out)


RANGES = [(0, 4096), (1, 1), (4095, 2), (65536, 65536), (SIZE - 100, 100), (0, SIZE), (1000, SIZE - 1000)]


async def image(graph: BlockGraph, where: Path, name: str = "f", **opts: object) -> tuple[BlockNode, bytes]:
    data = random.Random(7).randbytes(SIZE)
    (where / f"{name}.img").write_bytes(data)
    node = await graph.add({"driver": "file", "node-name": name, "filename": str(where / f"{name}.img"), **opts})
    return node, data


async def test_file_on_tmpfs_maps_every_range_to_bytes_that_never_block(graph: BlockGraph, shm: Path) -> None:
    node, data = await image(graph, shm)
    for off, n in RANGES:
        ext = node.map_now(off, n)
        assert ext is not None and total_length(ext) == n
        assert all(e[3] for e in ext)  # tmpfs pages never wait
        assert bytes_of(ext) == data[off : off + n] == bytes(await node.read(off, n))


async def test_file_on_disk_maps_to_bytes_that_may_block(graph: BlockGraph, tmp_path: Path) -> None:
    node, data = await image(graph, tmp_path)
    if node.map_now(0, 4096) is None:
        pytest.skip("this file system has no RWF_NOWAIT reads (the slow way is the contract then)")
    ext = node.map_now(0, SIZE)
    assert ext is not None and bytes_of(ext) == data
    assert not any(e[3] for e in ext if e[0] != ZEROES)


async def test_file_maps_past_its_end_to_zeroes_and_writes_only_inside(graph: BlockGraph, shm: Path) -> None:
    node, data = await image(graph, shm)
    ext = node.map_now(SIZE - 10, 30)
    assert [e[LENGTH] for e in ext] == [10, 20] and ext[1][0] == ZEROES
    assert bytes_of(ext) == data[-10:] + bytes(20) == bytes(await node.read(SIZE - 10, 30))
    assert node.map_now(SIZE - 10, 30, write=True) is None  # growth: the slow way
    w = node.map_now(0, 4096, write=True)
    assert w == [(node.fd, 0, 4096, True)]


async def test_direct_and_thread_policies_take_the_slow_way(graph: BlockGraph, shm: Path) -> None:
    node, _ = await image(graph, shm, "t", **{"x-io-policy": "threads"})
    assert node.map_now(0, 4096) is None and node.map_now(0, 4096, write=True) is None


async def test_read_only_node_refuses_a_write_mapping(graph: BlockGraph, shm: Path) -> None:
    node, _ = await image(graph, shm, "ro", **{"read-only": True})
    with pytest.raises(OSError):
        node.map_now(0, 4096, write=True)


async def test_raw_window_maps_inside_and_refuses_outside(graph: BlockGraph, shm: Path) -> None:
    _, data = await image(graph, shm)
    raw = await graph.add({"driver": "raw", "node-name": "r", "file": "f", "offset": 4096, "size": 65536})
    ext = raw.map_now(100, 5000)
    assert bytes_of(ext) == data[4196 : 4196 + 5000] == bytes(await raw.read(100, 5000))
    assert raw.map_now(65536 - 10, 20) is None  # leaves the window: read() zero-fills
    plain = await graph.add({"driver": "raw", "node-name": "p", "file": "f"})
    assert bytes_of(plain.map_now(0, SIZE)) == data


async def test_null_maps_to_zeroes_unless_it_has_latency(graph: BlockGraph) -> None:
    fast = await graph.add({"driver": "null-co", "node-name": "n", "size": 1 << 20})
    assert fast.map_now(0, 8192) == [(ZEROES, 0, 8192, True)]
    assert fast.map_now(0, 8192, write=True) == [(ZEROES, 0, 8192, True)]  # dropped
    slow = await graph.add({"driver": "null-co", "node-name": "s", "latency-ns": 1000})
    assert slow.map_now(0, 8192) is None


async def test_detect_zeroes_keeps_writes_on_the_slow_way(graph: BlockGraph, shm: Path) -> None:
    node, data = await image(graph, shm, "dz", **{"detect-zeroes": "on"})
    assert node.map_now(0, 4096, write=True) is None
    assert bytes_of(node.map_now(0, 4096)) == data[:4096]  # reads are unaffected


async def test_a_driver_overriding_read_is_never_bypassed() -> None:
    class Tracing(FileNode):
        async def read(self, offset: int, length: int):  # noqa: ANN201
            return await super().read(offset, length)

    class TracingWithMap(Tracing):
        def map_now(self, offset: int, length: int, *, write: bool = False):  # noqa: ANN201
            return []

    assert Tracing.map_now is BlockNode.map_now  # inherits "the slow way"
    assert TracingWithMap.map_now is not BlockNode.map_now
    assert FileNode.map_now is not BlockNode.map_now
