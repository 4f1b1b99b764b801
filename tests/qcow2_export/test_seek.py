"""SEEK_DATA/SEEK_HOLE on a qcow2 export match `qemu-img map` (data over the
whole backing chain): the full walk, and lseek at chosen offsets (extent
edges, odd offsets, EOF and past it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.qcow2_export import (
    expected_seek,
    export_qcow2,
    qemu_data_extents,
    seek_at,
    seek_extents,
    unexport,
)
from tests.support.qcow2_variants import VARIANTS, build
from tests.support.threads import athread


@pytest.mark.parametrize("variant", VARIANTS)
async def test_seek_matches_qemu_img_map(exportd: Exportd, workdir: Path, variant: str) -> None:
    img = await athread(build, variant, workdir, timeout=60)
    want = await qemu_data_extents(img)
    assert want, "the variant has data"
    mnt = workdir / "mnt.raw"
    await export_qcow2(exportd, img, mnt, writable=False)
    try:
        size = mnt.stat().st_size
        assert await athread(seek_extents, mnt) == want
        rng = random.Random(variant)
        offsets = {0, 1, size - 1, size, size + 1, size + (1 << 20)}
        for s, e in want:
            offsets |= {s - 1, s, s + 1, e - 1, e, e + 1}
        offsets |= {rng.randrange(size) for _ in range(40)}
        offsets = sorted(o for o in offsets if o >= 0)
        got = await athread(seek_at, mnt, offsets)
        for off, answer in zip(offsets, got, strict=True):
            assert answer == expected_seek(want, size, off), f"lseek at {off}"
    finally:
        await unexport(exportd)
