"""Random writes, punched holes and zeroed ranges through a writable FUSE
export of every variant (over backing files and with internal snapshots):
the export reads back what was written, then `qemu-img check` is clean,
`qemu-img compare` matches a raw copy that received the same writes, the
snapshots are unchanged, and SEEK_DATA/SEEK_HOLE agree with `qemu-img map`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tests.export.conftest import Exportd, arun, athread
from tests.qcow2.qhelpers import random_io_cmds
from tests.qcow2.variants import VARIANTS, build

from .helpers import (
    check_clean,
    compare_raw,
    convert_raw,
    export_qcow2,
    fileops,
    qemu_data_extents,
    read_mount,
    seek_extents,
    unexport,
)


async def qemu_io_raw(path: Path, cmds: list[str]) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = await arun([*args, str(path)], timeout=90)
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def aio_batch(rng: random.Random, size: int) -> list[str]:
    """Several non-overlapping writes in flight at once (qemu-io aio), then a
    flush (overlapping ones in flight would have no defined result)."""
    slot = 256 * 1024
    cmds = []
    for s in rng.sample(range(size // slot), k=8):
        off = s * slot + rng.randrange(0, 100) * 512
        ln = min(rng.choice([512, 4096, 65536, 150 * 1024]), size - off)
        cmds.append(f"aio_write -P {rng.randrange(1, 256)} {off} {ln}")
    return [*cmds, "aio_flush"]


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


@pytest.mark.parametrize("variant", VARIANTS)
async def test_random_writes_through_export(exportd: Exportd, workdir: Path, variant: str) -> None:
    d = exportd
    img = await athread(build, variant, workdir, timeout=60)
    ref = workdir / "ref.raw"
    original = await convert_raw(img, ref)
    snaps = {}
    if variant == "snapshots":
        for s in ("s1", "s2"):
            snaps[s] = await convert_raw(img, workdir / f"{s}.raw", snapshot=s)
    # half the variants with discard=unmap (holes are freed), half with QEMU's default
    opts = {"discard": "unmap"} if VARIANTS.index(variant) % 2 == 0 else {}
    mnt = workdir / "mnt.raw"
    await export_qcow2(d, img, mnt, writable=True, **opts)
    try:
        # 1: pwrite / fallocate punch-hole and zero-range from a child process
        await fileops(mnt, variant, 50, "fuse")
        await fileops(ref, variant, 50, "ref")
        # 2: qemu-io on the mount (writes, write -z, discard, concurrent aio)
        rng = random.Random(f"qemu-io-{variant}")
        size = ref.stat().st_size
        cmds = random_io_cmds(rng, size, 12) + aio_batch(rng, size)
        await qemu_io_raw(mnt, cmds)
        await qemu_io_raw(ref, cmds)
        got, want = await read_mount(mnt), ref.read_bytes()
        assert want != original  # the ops did change something
        assert got == want, f"export differs from the reference at {first_difference(got, want)}"
        # flushed (fsync, qemu-io's close): the image on disk is current, and
        # the live writable export's holes agree with it
        live = await athread(seek_extents, mnt)
        assert live == await qemu_data_extents(img, force_share=True)
    finally:
        await unexport(d)
    await check_clean(img)
    await compare_raw(img, ref)
    for s, before in snaps.items():
        assert await convert_raw(img, workdir / f"{s}-after.raw", snapshot=s) == before, s

    # the written image, exported again: holes where qemu-img map says so
    await export_qcow2(d, img, mnt, writable=False)
    try:
        assert await athread(seek_extents, mnt) == await qemu_data_extents(img)
        assert await read_mount(mnt) == ref.read_bytes()
    finally:
        await unexport(d)
