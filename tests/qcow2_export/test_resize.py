"""truncate(1) on a growable qcow2 export: growth (with an L1 table move on
small clusters, past the end of a backing chain, with snapshots), writes
straddling the old end, an unaligned size refused, shrinking refused while it
would drop data and done once the tail is zero (never with snapshots); then
`qemu-img check`, `qemu-img compare` and `qemu-img info` agree."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun
from tests.support.qcow2 import MiB
from tests.support.qcow2_export import (
    check_clean,
    compare_raw,
    convert_raw,
    export_qcow2,
    qemu_img,
    read_mount,
    unexport,
)
from tests.support.qcow2_variants import build
from tests.support.threads import athread


def pwrite_at(path: Path, pieces: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in pieces:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


async def truncate(path: Path, size: int) -> bool:
    r = await arun(["truncate", "-s", str(size), str(path)])
    return r.returncode == 0


@pytest.mark.parametrize("variant", ["v3-512", "v2", "backing3", "snapshots", "v3-4k-odd-size", "rc1"])
async def test_grow_write_shrink(exportd: Exportd, workdir: Path, variant: str) -> None:
    d = exportd
    img = await athread(build, variant, workdir, timeout=60)
    model = bytearray(await convert_raw(img, workdir / "before.raw"))
    old = len(model)
    new = old + 3 * MiB // 2 + 3 * 512
    rng = random.Random(variant)
    mnt = workdir / "mnt.raw"
    await export_qcow2(d, img, mnt, writable=True, export_opts={"growable": True})
    try:
        assert await truncate(mnt, new)
        assert mnt.stat().st_size == new
        model += bytes(new - old)
        pieces = [(old - 1000, rng.randbytes(2000)), (new - 5000, rng.randbytes(5000)),
                  (old + MiB, rng.randbytes(70_000))]
        await athread(pwrite_at, mnt, pieces)
        for off, data in pieces:
            model[off : off + len(data)] = data
        assert await read_mount(mnt) == bytes(model)

        assert not await truncate(mnt, new + 100), "an unaligned qcow2 size is refused"
        assert mnt.stat().st_size == new
        # shrinking would drop the data written past the old end: refused
        assert not await truncate(mnt, old)
        assert mnt.stat().st_size == new
        if variant != "snapshots":
            r = await arun(["fallocate", "-z", "-o", str(old), "-l", str(new - old), str(mnt)])
            assert r.returncode == 0, r.stderr
            assert await truncate(mnt, old), "nothing is lost past the old end now"
            assert mnt.stat().st_size == old
            model[old:] = b""
            model[old - 1000 : old] = pieces[0][1][:1000]
        assert await read_mount(mnt) == bytes(model)
    finally:
        await unexport(d)
    await check_clean(img)
    info = json.loads(await qemu_img("info", "--output=json", str(img)))
    assert info["virtual-size"] == len(model)
    ref = workdir / "model.raw"
    ref.write_bytes(model)
    await compare_raw(img, ref)
