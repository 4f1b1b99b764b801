"""Random writes, zero writes and discards through the qcow2 node in every
variant; then `qemu-img check` is clean and `qemu-img compare` matches a raw
copy that received the same writes. Snapshots stay intact."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from tests.support.qcow2 import MiB, check_clean, open_qcow2, read_all, read_image, run, to_raw
from tests.support.qcow2_variants import VARIANTS, build


def _aligned(node, off: int, ln: int) -> tuple[int, int]:
    cs = node.cs
    end = off + ln
    a = -(-off // cs) * cs
    b = end // cs * cs
    if end == node.getlength():
        b = -(-end // cs) * cs
    return a, max(a, min(b, node.getlength()))


async def apply_random_ops(node, model: bytearray, rng: random.Random, n: int) -> None:
    size = len(model)
    for _ in range(n):
        r = rng.random()
        off = rng.randrange(0, size)
        ln = min(rng.choice([1, 511, 512, 4096, 5000, 65536, 70000, 300_000, 1 << 20]), size - off)
        if r < 0.65:
            data = rng.randbytes(ln)
            await node.write(off, data)
            model[off : off + ln] = data
        elif r < 0.8:
            await node.write_zeroes(off, ln, may_unmap=rng.random() < 0.5)
            model[off : off + ln] = bytes(ln)
        elif r < 0.9:
            await node.discard(off, ln)
            if not (node.version < 3 and node.backing is not None):
                a, b = _aligned(node, off, ln)
                model[a:b] = bytes(b - a)
        else:
            # several non-overlapping writes at once (allocating and in place)
            slots = rng.sample(range(size // 65536), k=min(6, size // 65536))
            jobs = []
            for s in slots:
                o = s * 65536 + rng.randrange(0, 60000)
                d = rng.randbytes(rng.randrange(1, 5000))
                model[o : o + len(d)] = d
                jobs.append(node.write(o, d))
            await asyncio.gather(*jobs)
        if rng.random() < 0.1:
            await node.flush()


def snapshot_raws(img: Path, d: Path) -> dict[str, bytes]:
    out = {}
    for name in ("s1", "s2"):
        p = d / f"snap-{name}.raw"
        run("qemu-img", "convert", "-O", "raw", "-l", f"snapshot.name={name}", str(img), str(p))
        out[name] = p.read_bytes()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
async def test_random_writes(tmp_path: Path, variant: str) -> None:
    img = build(variant, tmp_path)
    model = bytearray(to_raw(img, tmp_path / "before.raw"))
    snaps = snapshot_raws(img, tmp_path) if variant == "snapshots" else None
    rng = random.Random(variant)
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img, discard="unmap")
        await apply_random_ops(node, model, rng, 60)
        assert await read_all(node) == bytes(model)
        await node.flush()
    finally:
        await g.close_all()
    check_clean(img)
    ref = tmp_path / "model.raw"
    ref.write_bytes(model)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(ref))
    if snaps is not None:
        assert snapshot_raws(img, tmp_path) == snaps
    # and our own reader agrees after reopening
    assert await read_image(img) == bytes(model)


async def test_refcount_table_growth(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB
    and the first table 2 MiB of file, so writing 3 MiB must grow the table."""
    img = tmp_path / "grow.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
        str(img), str(3 * MiB))
    rng = random.Random(7)
    model = bytearray(3 * MiB)
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        old_rt = node.header.refcount_table_offset
        for off in range(0, 3 * MiB, 96 * 1024):
            d = rng.randbytes(96 * 1024)
            await node.write(off, d)
            model[off : off + len(d)] = d
        await node.flush()
        assert node.header.refcount_table_offset != old_rt
    finally:
        await g.close_all()
    check_clean(img)
    assert to_raw(img, tmp_path / "out.raw") == bytes(model)


async def test_cow_from_backing_partial_clusters(graph, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(2 * MiB))
    run("qemu-io", "-c", "write -P 0x41 0 2M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    node = await open_qcow2(graph, top)
    assert node.backing is not None and node.backing.read_only
    await node.write(100, b"xyz")
    assert bytes(await node.read(0, 200)) == b"A" * 100 + b"xyz" + b"A" * 97
    await node.flush()
    await graph.close_all()
    check_clean(top)
    data = to_raw(top, tmp_path / "t.raw")
    assert data[:103] == b"A" * 100 + b"xyz" and data[103:] == b"A" * (2 * MiB - 103)
    base_data = to_raw(base, tmp_path / "b.raw")
    assert base_data == b"A" * (2 * MiB)


async def test_write_zeroes_uses_zero_flag_and_discard_frees(graph, tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(4 * MiB))
    run("qemu-io", "-c", "write -P 0x11 0 4M", str(img))
    size_before = img.stat().st_size
    node = await open_qcow2(graph, img, discard="unmap")
    await node.write_zeroes(0, 1 * MiB, may_unmap=False)  # keeps the allocation, zero flag
    await node.write_zeroes(1 * MiB, 1 * MiB, may_unmap=True)
    await node.discard(2 * MiB, 1 * MiB)
    await node.flush()
    await graph.close_all()
    info = check_clean(img)
    assert img.stat().st_size == size_before  # nothing allocated for zeroes
    qmap = json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
    first = qmap[0]
    assert (first["start"], first["length"]) == (0, MiB)
    assert first["zero"] and first["present"] and "offset" in first  # preallocated zero clusters
    mid = [e for e in qmap if e["start"] < 3 * MiB and e["start"] + e["length"] > MiB]
    assert mid and all(not e["data"] and e["zero"] and "offset" not in e for e in mid)
    # the freed clusters are reused by the next writes instead of growing the file
    g = BlockGraph(None)
    node = await open_qcow2(g, img)
    await node.write(3 * MiB, b"\x22" * MiB)  # overwrites in place
    await node.write(1 * MiB, b"\x33" * MiB)  # allocates: reuses freed clusters
    await node.flush()
    await g.close_all()
    check_clean(img)
    assert img.stat().st_size == size_before
    assert info["image-end-offset"] >= 4 * MiB


@pytest.mark.parametrize("variant", ["v3-512", "snapshots", "backing3"])
async def test_random_writes_tiny_l2_cache(tmp_path: Path, variant: str) -> None:
    """A two-table L2 cache forces write-back of dirty tables on eviction."""
    img = build(variant, tmp_path)
    model = bytearray(to_raw(img, tmp_path / "before.raw"))
    rng = random.Random("tiny" + variant)
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img, **{"l2-cache-size": 1024, "discard": "unmap"})
        assert node.l2cache.max_tables == 2
        await apply_random_ops(node, model, rng, 40)
        assert await read_all(node) == bytes(model)
    finally:
        await g.close_all()  # close flushes
    check_clean(img)
    ref = tmp_path / "model.raw"
    ref.write_bytes(model)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(ref))


async def test_concurrent_writes_into_same_clusters(tmp_path: Path) -> None:
    """Many in-flight writes to disjoint pieces of the same unallocated clusters
    (COW from a backing file) and reads of the untouched pieces meanwhile."""
    base = tmp_path / "cb.qcow2"
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(2 * MiB))
    run("qemu-io", "-c", "write -P 0x5c 0 2M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base.name,
        "-F", "qcow2", str(img))
    rng = random.Random(99)
    model = bytearray(b"\x5c" * (2 * MiB))
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img, **{"l2-cache-size": 8192})
        pieces = list(range(0, 2 * MiB, 1000))
        rng.shuffle(pieces)
        for batch_start in range(0, len(pieces), 64):
            jobs = []
            for p in pieces[batch_start : batch_start + 64]:
                d = rng.randbytes(min(1000, 2 * MiB - p))
                model[p : p + len(d)] = d
                jobs.append(node.write(p, d))
            # reads of pieces not written in this batch see a consistent state
            later = pieces[batch_start + 64 : batch_start + 80]
            reads = [node.read(p, min(1000, 2 * MiB - p)) for p in later]
            results = await asyncio.gather(*jobs, *reads)
            for p, data in zip(later, results[len(jobs):], strict=True):
                assert bytes(data) == bytes(model[p : p + 1000])
        assert await read_all(node) == bytes(model)
    finally:
        await g.close_all()
    check_clean(img)
    ref = tmp_path / "c.raw"
    ref.write_bytes(model)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(ref))


async def test_discard_gives_space_back_to_the_file(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(8 * MiB))
    run("qemu-io", "-c", "write -P 0x11 0 8M", str(img))
    used = img.stat().st_blocks * 512
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img, discard="unmap")
        await node.discard(0, 6 * MiB)
        await node.flush()
    finally:
        await g.close_all()
    check_clean(img)
    assert img.stat().st_blocks * 512 <= used - 5 * MiB  # clusters punched out of the file
    assert to_raw(img, tmp_path / "d.raw") == bytes(6 * MiB) + b"\x11" * (2 * MiB)
