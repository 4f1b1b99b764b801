"""fallocate(1) punch-hole and zero-range on a qcow2 export (aligned and not,
over compressed clusters, backing data and snapshot-shared clusters, up to
EOF), then writes into the punched space: the export reads the expected bytes,
`qemu-img check` is clean, `qemu-img compare` matches, snapshots are intact,
and on v3 images the whole clusters zeroed are holes for SEEK_DATA and map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun
from tests.support.qcow2 import MiB
from tests.support.qcow2_export import (
    check_clean,
    check_matches_model,
    convert_raw,
    export_qcow2,
    qemu_data_extents,
    qemu_img,
    read_mount,
    seek_extents,
    unexport,
)
from tests.support.qcow2_variants import build
from tests.support.threads import athread

K = 1024


def fallocate_ops(size: int) -> list[tuple[str, int, int]]:
    """(punch|zero|zero-keep-size, offset, length), starting inside the image."""
    return [
        ("punch", 0, 192 * K),
        ("punch", 300_000, 70_000),
        ("zero", 1 * MiB, 128 * K),
        ("zero", 2 * MiB + 100, 5000),
        ("zero", 2 * MiB + 512 * K, 512 * K),
        ("punch", 1 * MiB + 200 * K + 7, 1),
        ("zero-keep-size", size - 300 * K - 512, 200 * K),
        ("punch", size - 100 * K, 1 * MiB),  # past EOF: clipped, the size is kept
    ]


REWRITE = (64 * K, 64 * K, 0x7E)  # written with dd into punched space afterwards


@pytest.mark.parametrize(
    ("variant", "discard"),
    [("v3-64k", "unmap"), ("v3-64k", "ignore"), ("v3-512", "unmap"), ("v2", "unmap"),
     ("rc1", "unmap"), ("backing3", "unmap"), ("backing3", "ignore"), ("v2-backing", "unmap"),
     ("compressed-zlib", "unmap"), ("compressed-zstd", "unmap"), ("snapshots", "unmap")],
)
async def test_punch_and_zero_range(exportd: Exportd, workdir: Path, variant: str, discard: str) -> None:
    d = exportd
    img = await athread(build, variant, workdir, timeout=60)
    model = bytearray(await convert_raw(img, workdir / "before.raw"))
    size = len(model)
    snaps = {}
    if variant == "snapshots":
        for s in ("s1", "s2"):
            snaps[s] = await convert_raw(img, workdir / f"{s}.raw", snapshot=s)
    info = json.loads(await qemu_img("info", "--output=json", str(img)))
    cs, v3 = info["cluster-size"], info["format-specific"]["data"]["compat"] == "1.1"

    mnt = workdir / "mnt.raw"
    await export_qcow2(d, img, mnt, writable=True, discard=discard)
    try:
        for kind, off, ln in fallocate_ops(size):
            flags = {"punch": ["-p"], "zero": ["-z"], "zero-keep-size": ["-z", "-n"]}[kind]
            r = await arun(["fallocate", *flags, "-o", str(off), "-l", str(ln), str(mnt)])
            assert r.returncode == 0, f"fallocate {flags} {off} {ln}: {r.stderr}"
            end = min(off + ln, size)
            model[off:end] = bytes(end - off)
        assert mnt.stat().st_size == size  # punch and zero-range keep the size
        off, ln, pat = REWRITE
        (workdir / "pat.bin").write_bytes(bytes([pat]) * ln)
        r = await arun(["dd", f"if={workdir / 'pat.bin'}", f"of={mnt}", "bs=64k", f"seek={off // (64 * K)}",
                        "conv=notrunc,fsync", "status=none"])
        assert r.returncode == 0, r.stderr
        model[off : off + ln] = bytes([pat]) * ln
        assert await read_mount(mnt) == bytes(model)
    finally:
        await unexport(d)
    await check_matches_model(img, workdir, model, snaps)

    await export_qcow2(d, img, mnt, writable=False)
    try:
        extents = await athread(seek_extents, mnt)
        assert extents == await qemu_data_extents(img)
    finally:
        await unexport(d)
    if v3:
        # v3 zeroes whole clusters with the zero flag: they must read as holes
        for _, off, ln in fallocate_ops(size):
            end = min(off + ln, size)
            a, b = -(-off // cs) * cs, end // cs * cs
            if end == size:
                b = size
            if REWRITE[0] < b and a < REWRITE[0] + REWRITE[1]:
                b = min(b, REWRITE[0])  # the dd range is data again
            hits = [(s, e) for s, e in extents if s < b and a < e]
            assert a >= b or not hits, f"zeroed clusters [{a}, {b}) still data: {hits}"


SUB_CLUSTER_ZEROING = [("-p", 100, 1), ("-z", 2 * MiB + 100, 1), ("-z", 3 * MiB + 100, 70_000),
                       ("-p", 1 * MiB - 5000, 10_000)]


async def test_sub_cluster_zeroing_of_holes_allocates_nothing(exportd: Exportd, workdir: Path) -> None:
    """Punch-hole/zero-range of pieces of clusters that already read as zeroes
    (zero-flag clusters, unallocated ones without a backing file) leaves them
    holes and the file unchanged in size, as QEMU does for the same requests."""
    img = workdir / "holes.qcow2"
    await qemu_img("create", "-q", "-f", "qcow2", str(img), str(4 * MiB))
    r = await arun(["qemu-io", "-c", "write -z 0 1M", str(img)])  # zero-flag clusters
    assert r.returncode == 0, r.stderr
    theirs = workdir / "qemu.qcow2"
    theirs.write_bytes(img.read_bytes())
    r = await arun(["qemu-io", *[x for _, off, ln in SUB_CLUSTER_ZEROING
                                 for x in ("-c", f"write -z -u {off} {ln}")], str(theirs)])
    assert r.returncode == 0, r.stderr
    assert await qemu_data_extents(theirs) == [], "QEMU allocates nothing for these requests"
    end_before = json.loads(await qemu_img("check", "--output=json", str(img)))["image-end-offset"]

    mnt = workdir / "mnt.raw"
    await export_qcow2(exportd, img, mnt, writable=True, discard="unmap")
    try:
        for flag, off, ln in SUB_CLUSTER_ZEROING:
            r = await arun(["fallocate", flag, "-o", str(off), "-l", str(ln), str(mnt)])
            assert r.returncode == 0, r.stderr
        assert await read_mount(mnt) == bytes(4 * MiB)
    finally:
        await unexport(exportd)
    await check_clean(img)
    assert await qemu_data_extents(img) == []
    assert json.loads(await qemu_img("check", "--output=json", str(img)))["image-end-offset"] == end_before
