"""Many FUSE writes in flight at once on a qcow2 export (the export opens
files with parallel direct writes): several threads write interleaved,
unaligned stripes that share clusters (allocation, copy-on-write from backing
files and from snapshot-shared clusters at the same time) while another thread
reads untouched data; and two overlays of one base written at the same time."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.qcow2 import MiB
from tests.support.qcow2_export import (
    check_clean,
    check_matches_model,
    compare_raw,
    convert_raw,
    export_qcow2,
    qemu_img,
    read_mount,
    unexport,
)
from tests.support.qcow2_variants import build
from tests.support.threads import athread

STRIPE = 3000  # unaligned, so neighbouring stripes of different threads share clusters
WRITERS = 4


def write_stripes(path: Path, seed: str, t: int, end: int) -> dict[int, bytes]:
    """Thread `t` of WRITERS writes stripes t, t + WRITERS + 1, ... below `end`
    (stripes WRITERS, 2 * WRITERS + 1, ... are left for the reader)."""
    rng = random.Random(f"{seed}-{t}")
    written = {}
    fd = os.open(path, os.O_WRONLY)
    try:
        offsets = list(range(t * STRIPE, end, (WRITERS + 1) * STRIPE))
        rng.shuffle(offsets)
        for off in offsets:
            data = rng.randbytes(min(STRIPE, end - off))
            assert os.pwrite(fd, data, off) == len(data)
            written[off] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def read_untouched(path: Path, end: int, original: bytes, done: threading.Event) -> int:
    """Until `done`, read the reader's stripes (in clusters the writers are
    allocating or copying at the same time) and data above `end`: all must read
    as before. Returns the number of reads."""
    fd = os.open(path, os.O_RDONLY)
    reads = 0
    try:
        rng = random.Random(end)
        offsets = list(range(WRITERS * STRIPE, end, (WRITERS + 1) * STRIPE))
        while not done.is_set() or reads < 20:
            off = rng.choice(offsets)
            n = min(STRIPE, end - off)
            assert os.pread(fd, n, off) == original[off : off + n], f"stripe at {off}"
            off = rng.randrange(end, len(original) - 70_000)
            assert os.pread(fd, 70_000, off) == original[off : off + 70_000], off
            reads += 2
    finally:
        os.close(fd)
    return reads


@pytest.mark.parametrize(
    ("variant", "l2_cache"),
    [("backing3", None), ("backing3", 2048), ("snapshots", None), ("v3-512", 1024),
     ("compressed-zstd", None), ("rc64", None), ("v2-backing", None), ("raw-backing", 8192)],
)
async def test_parallel_writers_share_clusters(exportd: Exportd, workdir: Path, variant: str,
                                               l2_cache: int | None) -> None:
    d = exportd
    img = await athread(build, variant, workdir, timeout=60)
    model = bytearray(await convert_raw(img, workdir / "before.raw"))
    snaps = {}
    if variant == "snapshots":
        for s in ("s1", "s2"):
            snaps[s] = await convert_raw(img, workdir / f"{s}.raw", snapshot=s)
    end = 1 * MiB + 12345  # the writers' area (with the reader's stripes); above it is only read
    opts = {"l2-cache-size": l2_cache} if l2_cache else {}
    mnt = workdir / "mnt.raw"
    await export_qcow2(d, img, mnt, writable=True, **opts)
    try:
        done = threading.Event()
        reader = asyncio.ensure_future(
            asyncio.to_thread(read_untouched, mnt, end, bytes(model), done))
        jobs = [asyncio.to_thread(write_stripes, mnt, variant, t, end) for t in range(WRITERS)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*jobs), 60)
        finally:
            done.set()
            await asyncio.wait_for(reader, 60)
        for written in results:
            for off, data in written.items():
                model[off : off + len(data)] = data
        assert await read_mount(mnt) == bytes(model)
    finally:
        await unexport(d)
    await check_matches_model(img, workdir, model, snaps)


async def test_two_overlays_of_one_base(exportd: Exportd, workdir: Path) -> None:
    """Two exports whose images share a backing file, written at the same time:
    the base stays unchanged and each overlay holds only its own writes."""
    d = exportd
    base = workdir / "base.qcow2"
    await qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), str(3 * MiB))
    src = workdir / "src.bin"
    src.write_bytes(random.Random(5).randbytes(3 * MiB))
    await qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), str(base))
    base_before = await convert_raw(base, workdir / "base-before.raw")
    tops = [workdir / f"top{i}.qcow2" for i in range(2)]
    for i, top in enumerate(tops):
        await qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={16384 << i}",
                       "-b", base.name, "-F", "qcow2", str(top))
    mnts = [workdir / f"m{i}.raw" for i in range(2)]
    for i in range(2):
        await export_qcow2(d, tops[i], mnts[i], writable=True, node=f"q{i}", export_id=f"e{i}")
    models = [bytearray(base_before) for _ in range(2)]
    try:
        jobs = [asyncio.to_thread(write_stripes, mnts[i], f"ov{i}", t, 2 * MiB + 777)
                for i in range(2) for t in range(2)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 60)
        for k, written in enumerate(results):
            for off, data in written.items():
                models[k // 2][off : off + len(data)] = data
        for i in range(2):
            assert await read_mount(mnts[i]) == bytes(models[i])
    finally:
        for i in range(2):
            await unexport(d, node=f"q{i}", export_id=f"e{i}")
    await check_clean(base)
    assert await convert_raw(base, workdir / "base-after.raw") == base_before
    for i, top in enumerate(tops):
        await check_clean(top)
        ref = workdir / f"model{i}.raw"
        ref.write_bytes(models[i])
        await compare_raw(top, ref)
