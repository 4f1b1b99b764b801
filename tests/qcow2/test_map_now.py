"""The synchronous data path of the qcow2 node (BlockNode.map_now): what it
maps, what it leaves to read()/write() (None), and that the bytes it points
at are the bytes read() returns."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.node import BlockNode
from exportd.extents import ZEROES, Extent, total_length
from tests.support.qcow2 import MiB, check_clean, open_qcow2, qemu_io, run

CS = 65536



def bytes_of(extents: list[Extent]) -> bytes:
    out = bytearray()
    for fd, off, n, _ in extents:
        out += bytes(n) if fd == ZEROES else os.pread(fd, n, off).ljust(n, b"\0")
    return bytes(out)


def image(d: Path, name: str = "a.qcow2", size: int = 4 * MiB, *cmds: str, backing: Path | None = None) -> Path:
    img = d / name
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    run(*args, str(img), str(size))
    if cmds:
        qemu_io(img, list(cmds))
    return img


async def warm(node: BlockNode) -> None:
    """Load every L2 table (map_now never does I/O)."""
    await node.read(0, node.getlength())


async def test_reads_map_to_the_file_and_zeroes(graph: BlockGraph, shm: Path) -> None:
    img = image(shm, "a.qcow2", 4 * MiB, "write -P 0x61 0 192k", "write -P 0x62 1M 64k", "write -z 2M 64k")
    node = await open_qcow2(graph, img, **{"read-only": True})
    assert node.map_now(0, 4096) is None  # L2 table not loaded yet: the slow way
    await warm(node)
    # one cluster, several clusters, a range across data, zeroes and nothing
    for off, n in [(4096, 4096), (0, 3 * CS), (100, 2 * MiB), (CS - 10, 20), (2 * MiB - 5, CS + 10)]:
        ext = node.map_now(off, n)
        assert ext is not None and total_length(ext) == n
        assert all(nb for *_, nb in ext), "a tmpfs image never blocks"
        assert bytes_of(ext) == bytes(await node.read(off, n))
    # unallocated and zero clusters: zeroes, no file
    assert node.map_now(3 * MiB, CS) == [(ZEROES, 0, CS, True)]
    assert node.map_now(2 * MiB, CS) == [(ZEROES, 0, CS, True)]


async def test_disk_file_may_block(graph: BlockGraph, tmp_path: Path) -> None:
    """A page-cache image maps too, but says its pages may block."""
    img = image(tmp_path, "d.qcow2", MiB, "write -P 0x33 0 64k")
    node = await open_qcow2(graph, img, **{"read-only": True})
    await warm(node)
    ext = node.map_now(0, 4096)
    if node.file.map_now(0, 4096) is None:
        assert ext is None  # x-io-policy=threads or no RWF_NOWAIT: the slow way
    else:
        assert ext is not None and ext[0][0] >= 0 and not ext[0][3]


async def test_compressed_clusters_go_the_slow_way(graph: BlockGraph, shm: Path) -> None:
    img = image(shm, "c.qcow2", MiB)
    qemu_io(img, ["write -c -P 0x44 0 64k", "write -P 0x45 64k 64k"])
    node = await open_qcow2(graph, img, **{"read-only": True})
    await warm(node)
    assert node.map_now(0, 4096) is None
    assert node.map_now(CS - 100, 200) is None  # partly compressed
    assert bytes_of(node.map_now(CS, 4096) or []) == b"\x45" * 4096


async def test_backing_node_maps_clipped_at_its_length(graph: BlockGraph, shm: Path) -> None:
    base = image(shm, "base.qcow2", MiB, "write -P 0x11 0 1M")
    top = image(shm, "top.qcow2", 2 * MiB, "write -P 0x22 64k 64k", backing=base)
    node = await open_qcow2(graph, top, **{"read-only": True})
    await warm(node)
    await warm(node.backing)
    ext = node.map_now(0, 2 * CS)
    assert ext is not None and bytes_of(ext) == b"\x11" * CS + b"\x22" * CS
    # unallocated in the top, past the backing node's end: zeroes
    ext = node.map_now(MiB - 4096, 8192)
    assert ext is not None and bytes_of(ext) == b"\x11" * 4096 + bytes(4096)
    assert ext[-1][0] == ZEROES
    assert bytes_of(node.map_now(MiB + CS, 4096) or []) == bytes(4096)


async def test_writes_map_only_clusters_that_are_ours(graph: BlockGraph, shm: Path) -> None:
    img = image(shm, "w.qcow2", 4 * MiB, "write -P 0x61 0 256k")
    node = await open_qcow2(graph, img)
    await warm(node)
    ext = node.map_now(4096, 2 * CS, write=True)  # several clusters, all ours
    assert ext is not None and total_length(ext) == 2 * CS and all(fd >= 0 for fd, *_ in ext)
    for fd, off, n, _ in ext:
        os.pwrite(fd, b"\x77" * n, off)
    assert bytes(await node.read(4096, 2 * CS)) == b"\x77" * (2 * CS)
    # unallocated, zero or partly unallocated: the allocating write() must run
    assert node.map_now(MiB, 4096, write=True) is None
    assert node.map_now(256 * 1024 - 100, 200, write=True) is None
    await node.write_zeroes(0, CS)
    assert node.map_now(0, 4096, write=True) is None
    # what write() would refuse raises
    with pytest.raises(OSError) as e:
        node.map_now(4 * MiB - 100, 200, write=True)
    assert e.value.errno == errno.ENOSPC
    await graph.close_all()
    check_clean(img)


async def test_write_mapping_refused_on_read_only_node(graph: BlockGraph, shm: Path) -> None:
    img = image(shm, "r.qcow2", MiB, "write -P 1 0 64k")
    node = await open_qcow2(graph, img, **{"read-only": True})
    await warm(node)
    with pytest.raises(OSError) as e:
        node.map_now(0, 4096, write=True)
    assert e.value.errno == errno.EROFS


async def test_clusters_shared_with_a_snapshot_are_not_written_in_place(graph: BlockGraph, shm: Path) -> None:
    img = image(shm, "s.qcow2", MiB, "write -P 0x5 0 128k")
    run("qemu-img", "snapshot", "-c", "snap", str(img))
    node = await open_qcow2(graph, img)
    await warm(node)
    assert node.map_now(0, 4096) is not None
    assert node.map_now(0, 4096, write=True) is None
    await node.write(0, b"\x06" * 4096)  # copy-on-write: now the cluster is ours
    assert node.map_now(0, 4096, write=True) is not None
    await graph.close_all()
    check_clean(img)


async def test_replacing_the_file_child_is_followed(graph: BlockGraph, shm: Path) -> None:
    """The node reaches its file through the edge: a replaced file (a mirror
    pivot) is where map_now and read() go afterwards."""
    img = image(shm, "o.qcow2", MiB, "write -P 0x71 0 64k")
    copy = shm / "copy.qcow2"
    shutil.copyfile(img, copy)
    qemu_io(copy, ["write -P 0x72 0 64k"])  # same layout, other bytes
    node = await open_qcow2(graph, img, **{"read-only": True})
    other = await graph.add({"driver": "file", "node-name": "other", "filename": str(copy), "read-only": True})
    await warm(node)
    old_file = node.file
    graph.replace_node(old_file, other)
    assert node.file is other
    assert bytes_of(node.map_now(0, 4096) or []) == b"\x72" * 4096
    assert bytes(await node.read(0, 4096)) == b"\x72" * 4096
