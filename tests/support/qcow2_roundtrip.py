"""The write round trip shared by the write tests: seeded random writes,
punched holes and zeroed ranges (fileops.py) plus qemu-io writes, discards and
concurrent aio on a writable FUSE export of a qcow2 image and the same on a
raw copy; the export reads back the copy, SEEK_DATA/SEEK_HOLE agree with
`qemu-img map -U` after the flush; then `qemu-img check` is clean, `qemu-img
compare` matches the copy, the named snapshots are unchanged, and the image
exported again reads the same and seeks as `qemu-img map` says."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tests.support.daemon import Exportd
from tests.support.programs import arun
from tests.support.qcow2 import random_io_cmds
from tests.support.qcow2_export import (
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
from tests.support.threads import athread


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


async def roundtrip(d: Exportd, workdir: Path, img: Path, seed: str, *, snapshots: tuple[str, ...] = (),
                    ops: int = 50, **node_opts: Any) -> None:
    ref = workdir / "ref.raw"
    original = await convert_raw(img, ref)
    snaps = {s: await convert_raw(img, workdir / f"{s}.raw", snapshot=s) for s in snapshots}
    mnt = workdir / "mnt.raw"
    await export_qcow2(d, img, mnt, writable=True, **node_opts)
    try:
        # 1: pwrite / fallocate punch-hole and zero-range from a child process
        await fileops(mnt, seed, ops, "fuse")
        await fileops(ref, seed, ops, "ref")
        # 2: qemu-io on the mount (writes, write -z, discard, concurrent aio)
        rng = random.Random(f"qemu-io-{seed}")
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
