"""The qcow2 compressed-cluster writer (block/qcow2/compressed_write.py):
clusters written compressed read back the same, before and after a reopen;
`qemu-img check` is clean (refcounts of host clusters shared by several
compressed pieces), `qemu-img map` shows compressed clusters where the
data shrank and plain ones where it did not, `qemu-img convert` gives the
data back; overwriting and discarding compressed clusters leaves a clean
image; compression never overwrites an allocated cluster."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.qcow2.cluster import COMPRESSED, OFFSET_MASK
from tests.qcow2.test_powercut import PowerCut, PowerCutDevice, powercut_driver  # noqa: F401 (its fixture)
from tests.support.qcow2 import check_clean, open_qcow2, read_all, read_image, run, to_raw


def text_like(rng: random.Random, n: int) -> bytes:
    """Compressible, and different in every cluster."""
    words = [rng.randbytes(rng.randrange(3, 9)).hex().encode() for _ in range(40)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def qemu_map(img: Path) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)


def compressed_ranges(img: Path, cs: int) -> set[int]:
    """Guest cluster offsets qemu-img map shows compressed (data without a
    host offset; it merges neighbours into one entry)."""
    return {c for e in qemu_map(img) if e["data"] and "offset" not in e
            for c in range(e["start"], e["start"] + e["length"], cs)}


async def l2_entry(node, guest: int) -> int:
    runs = await node._map(guest, 1)
    return runs[0][3]


@pytest.mark.parametrize("cluster_size,ctype", [(65536, "zlib"), (4096, "zlib"), (512, "zlib"),
                                                (2 << 20, "zlib"), (65536, "zstd")])
async def test_write_read_reopen(tmp_path: Path, cluster_size: int, ctype: str) -> None:
    if ctype == "zstd":
        pytest.importorskip("zstandard")
    cs = cluster_size
    nclusters = 24 if cs < (1 << 20) else 6
    size = nclusters * cs - (1024 if cs > 512 else 0)  # a partial last cluster: written whole, zero-padded
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compression_type={ctype}",
        str(img), str(size))
    rng = random.Random(cs)
    model = bytearray(size)
    kinds: dict[int, str] = {}
    for i in range(nclusters):
        kind = ["text", "random", "text", "zeroes", "text", "half"][i % 6]
        kinds[i * cs] = kind
        n = min(cs, size - i * cs)
        if kind == "text":
            data = text_like(rng, n)
        elif kind == "random":
            data = rng.randbytes(n)  # incompressible: written plain
        elif kind == "zeroes":
            data = bytes(n)
        else:
            data = text_like(rng, n // 2) + rng.randbytes(n - n // 2)
        model[i * cs : i * cs + n] = data
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        # in two calls of several clusters each, not in order
        half = (nclusters // 2) * cs
        await node.write_compressed(half, bytes(model[half:]))
        await node.write_compressed(0, bytes(model[:half]))
        assert await read_all(node) == bytes(model)
        entries = {g_off: await l2_entry(node, g_off) for g_off in kinds}
        # compressed: the flag, no COPIED; the incompressible ones plain
        for g_off, kind in kinds.items():
            e = entries[g_off]
            if kind == "random":
                assert not e & COMPRESSED and e & OFFSET_MASK, (g_off, hex(e))
            else:
                assert e & COMPRESSED and not e >> 63, (g_off, kind, hex(e))
        # packed: small pieces share host clusters
        hosts = [e & node.comp_off_mask for e in entries.values() if e & COMPRESSED]
        assert len({h >> node.cluster_bits for h in hosts}) < len(hosts)
        # never over an allocated cluster
        with pytest.raises(OSError) as exc:
            await node.write_compressed(0, bytes(model[:cs]))
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:  # not whole clusters
            await node.write_compressed(0, bytes(cs // 2))
        assert exc.value.errno == errno.EINVAL
        await node.flush()
    finally:
        await g.close_all()
    check_clean(img)
    assert compressed_ranges(img, cs) == {g_off for g_off, k in kinds.items() if k != "random"}
    raw = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    assert raw.read_bytes() == bytes(model)
    # exportd's own reader after a reopen
    assert await read_image(img) == bytes(model)


async def test_overwrite_discard_and_reuse(tmp_path: Path) -> None:
    """Plain writes over compressed clusters, discards and compressed writes
    again: refcounts stay exact (no leaks, no double use), also across a
    reopen (a fresh node starts a new host cluster for its pieces)."""
    cs = 65536
    size = 64 * cs
    img = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
    rng = random.Random(5)
    model = bytearray(size)
    for i in range(0, 64, 2):  # every other cluster compressed, the rest empty
        model[i * cs : (i + 1) * cs] = text_like(rng, cs)
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        for i in range(0, 64, 2):
            await node.write_compressed(i * cs, bytes(model[i * cs : (i + 1) * cs]))
    finally:
        await g.close_all()
    for round_ in range(3):
        g = BlockGraph(None)
        try:
            node = await open_qcow2(g, img, discard="unmap")
            for i in rng.sample(range(64), 20):
                e = await l2_entry(node, i * cs)
                if e & (COMPRESSED | OFFSET_MASK):
                    if rng.random() < 0.5:
                        await node.discard(i * cs, cs)
                        model[i * cs : (i + 1) * cs] = bytes(cs)
                    else:
                        data = rng.randbytes(1000)
                        off = i * cs + rng.randrange(0, cs - 1000)
                        await node.write(off, data)  # copies the cluster out of its compressed form
                        model[off : off + 1000] = data
                else:
                    data = text_like(rng, cs)
                    await node.write_compressed(i * cs, data)
                    model[i * cs : (i + 1) * cs] = data
                if rng.random() < 0.3:
                    await node.flush()  # applies the frees: freed host clusters are reused
            assert await read_all(node) == bytes(model), round_
        finally:
            await g.close_all()
        check_clean(img)
    raw = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    assert raw.read_bytes() == bytes(model)


async def test_size_close_to_qemu(tmp_path: Path) -> None:
    """The same data written compressed by exportd and by `qemu-img convert
    -c` (which writes compressed clusters through the same qcow2 code as a
    compressing backup): the same clusters compressed, the same content,
    files of about the same size (the same deflate parameters)."""
    cs = 65536
    rng = random.Random(9)
    data = b"".join(text_like(rng, cs) if i % 3 else rng.randbytes(cs) for i in range(30))
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    theirs = tmp_path / "theirs.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(theirs))
    ours = tmp_path / "ours.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(ours), str(len(data)))
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, ours)
        await node.write_compressed(0, data)
    finally:
        await g.close_all()
    check_clean(ours)
    run("qemu-img", "compare", str(theirs), str(ours))
    assert compressed_ranges(ours, cs) == compressed_ranges(theirs, cs)
    a, b = theirs.stat().st_size, ours.stat().st_size
    assert abs(a - b) <= 2 * cs, (a, b)


def _compressed_ops(rng: random.Random, nclusters: int, cs: int, n: int) -> list[tuple[str, int, bytes]]:
    """Compressed writes into clusters that hold nothing (the first time, or
    after a discard), plain writes over compressed ones, discards, flushes."""
    out: list[tuple[str, int, bytes]] = []
    empty = set(range(nclusters))
    for _ in range(n):
        r = rng.random()
        if r < 0.55 and empty:
            c = rng.choice(sorted(empty))
            empty.discard(c)
            out.append(("compressed", c * cs, text_like(rng, cs) if rng.random() < 0.9 else rng.randbytes(cs)))
        elif r < 0.7 and len(empty) < nclusters:
            c = rng.choice(sorted(set(range(nclusters)) - empty))
            out.append(("write", c * cs + rng.randrange(0, cs - 600), rng.randbytes(600)))
        elif r < 0.85 and len(empty) < nclusters:
            c = rng.choice(sorted(set(range(nclusters)) - empty))
            empty.add(c)
            out.append(("discard", c * cs, b""))
        else:
            out.append(("flush", 0, b""))
    return out


@pytest.mark.usefixtures("powercut_driver")
async def test_power_cut_during_compressed_writes(tmp_path: Path) -> None:
    """The power goes at any device call of a sequence of compressed writes
    (pieces sharing host clusters), overwrites and discards: `qemu-img check`
    finds no corruption (leaks at most) and what a flush acknowledged reads
    back."""
    cs, nclusters = 4096, 48
    size = cs * nclusters
    img = tmp_path / "pc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(img), str(size))
    pristine = img.read_bytes()

    async def play(ops: list[tuple[str, int, bytes]], cut: int | None) -> tuple[PowerCutDevice, bytes, list]:
        img.write_bytes(pristine)
        g = BlockGraph(None)
        dev = await g.add({"driver": "x-powercut-test", "node-name": "dev", "filename": str(img)})
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": "dev", "discard": "unmap"})
        dev.cut_after = cut
        model, acked, touched = bytearray(size), bytes(size), []
        try:
            for kind, off, data in ops:
                if kind == "compressed":
                    touched.append((off, off + cs))
                    await node.write_compressed(off, data)
                    model[off : off + cs] = data
                elif kind == "write":
                    touched.append((off, off + len(data)))
                    await node.write(off, data)
                    model[off : off + len(data)] = data
                elif kind == "discard":
                    touched.append((off, off + cs))
                    await node.discard(off, cs)
                    model[off : off + cs] = bytes(cs)
                else:
                    await node.flush()
                    acked, touched = bytes(model), []
            await node.flush()
            acked, touched = bytes(model), []
        except PowerCut:
            pass
        finally:
            if cut is not None:
                dev.dead = True  # nothing more reaches the disk, not even at close
            await g.close_all()
        return dev, acked, touched

    for trial in range(12):
        rng = random.Random(trial)
        ops = _compressed_ops(random.Random(trial // 4), nclusters, cs, 60)
        dev, _, _ = await play(ops, None)
        total = dev.calls
        cut = rng.randrange(1, total + 1)
        dev, acked, touched = await play(ops, cut)
        img.write_bytes(dev.after_power_cut(rng))
        r = run("qemu-img", "check", "--output=json", str(img), check=False)
        assert r.returncode in (0, 3), f"trial {trial} cut {cut}/{total}: {r.stdout}{r.stderr}"
        got = to_raw(img, tmp_path / "got.raw")
        for o in range(0, size, 512):
            if not any(lo < o + 512 and o < hi for lo, hi in touched):
                assert got[o : o + 512] == acked[o : o + 512], f"trial {trial}: flushed data lost at {o}"
