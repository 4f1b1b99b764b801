"""Every qemu-img-made variant (v2/v3, cluster sizes 512 B..2 MiB, odd size,
zlib/zstd compression, backing chain of depth 3, internal snapshots,
refcount_bits 1 and 64, lazy refcounts, raw backing) exported read-only
through FUSE reads byte-for-byte as `qemu-img convert -O raw` gives."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.qcow2_export import convert_raw, export_qcow2, read_mount, unexport
from tests.support.qcow2_variants import VARIANTS, build
from tests.support.threads import athread


def pread_pieces(path: Path, pieces: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, n, off) for off, n in pieces]
    finally:
        os.close(fd)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_export_reads_match_convert(exportd: Exportd, workdir: Path, variant: str) -> None:
    img = await athread(build, variant, workdir, timeout=60)
    ref = await convert_raw(img, workdir / "ref.raw")
    mnt = workdir / "mnt.raw"
    await export_qcow2(exportd, img, mnt, writable=False)
    try:
        assert mnt.stat().st_size == len(ref)
        got = await read_mount(mnt)
        assert len(got) == len(ref)
        assert got == ref, f"first difference at {next(i for i in range(len(ref)) if got[i] != ref[i])}"
        # unaligned reads, across cluster edges and up to (and past) EOF
        rng = random.Random(variant)
        pieces = [(1, 1000), (65535, 3), (len(ref) - 700, 700), (len(ref) - 5, 100), (12345, 200_000)]
        pieces += [(rng.randrange(len(ref)), rng.choice([1, 511, 4097, 70_000])) for _ in range(20)]
        for (off, n), data in zip(pieces, await athread(pread_pieces, mnt, pieces), strict=True):
            assert data == ref[off : off + n], (off, n)
    finally:
        await unexport(exportd)
