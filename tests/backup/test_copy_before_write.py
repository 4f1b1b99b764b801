"""Copy-before-write step by step, on real nodes (exportd.block.jobs.cbw):
a write waits for a copy of its cluster that is in flight, the old data
reaches the target before the new data lands, a cluster is copied once,
and the point-in-time view serves a reader whose allocation lookup went
stale (the target's cluster was unallocated when it looked) the old data."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from exportd.block.graph import BlockGraph
from exportd.block.jobs.cbw import BlockCopy, CopyBeforeWriteFilter, PointInTimeView, cluster_size
from exportd.block.node import BlockNode, Perm

K = 1024
SIZE = 1 << 20


async def nodes(graph: BlockGraph, d: Path) -> tuple[BlockNode, BlockNode]:
    """source: raw, 'a' everywhere; target: an empty qcow2."""
    (d / "src.raw").write_bytes(b"a" * SIZE)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "dst.qcow2"), str(SIZE)], check=True)
    src = await graph.add({"driver": "raw", "node-name": "src", "file": {"driver": "file", "filename": str(d / "src.raw")}})
    dst = await graph.add({"driver": "qcow2", "node-name": "dst",
                           "file": {"driver": "file", "filename": str(d / "dst.qcow2")}})
    return src, dst


def cbw(graph: BlockGraph, src: BlockNode, dst: BlockNode) -> tuple[BlockCopy, CopyBeforeWriteFilter]:
    bcs = BlockCopy(src, dst, cluster_size(dst))
    bcs.dirty.mark(0, SIZE)
    filt = CopyBeforeWriteFilter("f", owner=None, bcs=bcs)
    graph.insert_filter(src, filt, "file")
    copied: list[int] = []

    async def before_write(offset: int, length: int) -> None:
        copied.append(await bcs.copy(offset, length))

    filt.before_write = before_write
    filt.copied = copied  # type: ignore[attr-defined]
    return bcs, filt


async def test_write_waits_for_a_copy_in_flight_then_copies_first(graph: BlockGraph, tmp_path: Path) -> None:
    src, dst = await nodes(graph, tmp_path)
    bcs, filt = cbw(graph, src, dst)
    assert bcs.cluster == 64 * K
    token = await bcs.locks.acquire(0, 64 * K)  # the job's copy of cluster 0 is in flight
    write = asyncio.ensure_future(filt.write(4 * K, b"b" * 4 * K))
    await asyncio.sleep(0.05)
    assert not write.done() and bytes(await src.read(4 * K, 4)) == b"aaaa", "the write did not wait"
    bcs.locks.release(token)
    await write
    assert filt.copied == [64 * K]  # type: ignore[attr-defined]
    assert bytes(await dst.read(0, 64 * K)) == b"a" * 64 * K  # the old data, the whole cluster
    assert bytes(await src.read(4 * K, 4 * K)) == b"b" * 4 * K
    assert not bcs.dirty.is_dirty(0) and bcs.dirty.is_dirty(64 * K)
    # a second write to the cluster copies nothing: the target keeps the old data
    await filt.write(0, b"c" * 512)
    assert filt.copied == [64 * K, 0]  # type: ignore[attr-defined]
    assert bytes(await dst.read(0, 8)) == b"aaaaaaaa"
    # zeroes and discards copy first too, across clusters
    await filt.write_zeroes(100 * K, 100 * K)
    assert filt.copied[-1] == 3 * 64 * K  # type: ignore[attr-defined]
    assert bytes(await dst.read(64 * K, 192 * K)) == b"a" * 192 * K
    assert bytes(await src.read(100 * K, 8)) == bytes(8)


async def test_view_serves_the_old_data_after_the_write(graph: BlockGraph, tmp_path: Path) -> None:
    src, dst = await nodes(graph, tmp_path)
    bcs, filt = cbw(graph, src, dst)
    view = PointInTimeView("v", bcs)
    view.child_edges["file"] = src.attach(view, Perm.CONSISTENT_READ, Perm.ALL, "file")
    # a reader of the target found cluster 0 unallocated and turns to the
    # backing data; meanwhile the cluster is copied and overwritten
    await filt.write(0, b"b" * 64 * K)
    assert bytes(await src.read(0, 4)) == b"bbbb"
    assert bytes(await view.read(0, 64 * K)) == b"a" * 64 * K  # from the target: the old data
    assert bytes(await view.read(64 * K, 4)) == b"aaaa"  # not copied yet: from the source
    # a read in flight on a cluster holds it: the write (and its copy) waits
    token = await bcs.locks.acquire(128 * K, 64 * K)  # stands for the view's read of that cluster
    write = asyncio.ensure_future(filt.write(130 * K, b"d" * K))
    await asyncio.sleep(0.05)
    assert not write.done()
    bcs.locks.release(token)
    await write
    assert bytes(await view.read(128 * K, 64 * K)) == b"a" * 64 * K
    src.detach(view.child_edges.pop("file"))
