"""Variant combinations tests/qcow2/variants.py does not make, through the
write round trip (roundtrip.py): snapshots on v2 images with 512-byte
clusters, compressed zstd clusters shared with a snapshot, 2-bit refcounts at
their maximum (two snapshots), snapshots in an overlay over a backing file,
lazy refcounts with a snapshot, 2 MiB clusters with 64-bit refcounts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.qcow2 import MiB, qemu_io, random_io_cmds, run
from tests.support.qcow2_roundtrip import roundtrip
from tests.support.threads import athread

# name -> (create options, size, snapshots, compressed with, with backing)
COMBOS = {
    "v2-512-snap": ("compat=0.10,cluster_size=512", 2 * MiB, ("s1",), None, False),
    "zstd-snap": ("cluster_size=16384,compression_type=zstd", 4 * MiB, ("s1",), "zstd", False),
    "rc2-512-two-snaps": ("refcount_bits=2,cluster_size=512", 2 * MiB, ("s1", "s2"), None, False),
    "backing-overlay-snap": ("cluster_size=4096", 4 * MiB, ("s1",), None, True),
    "lazy-snap": ("lazy_refcounts=on,cluster_size=8192", 4 * MiB, ("s1",), None, False),
    "2m-rc64": ("cluster_size=2M,refcount_bits=64", 6 * MiB, ("s1",), None, False),
}


def make_combo(name: str, d: Path) -> Path:
    opts, size, snaps, compress, with_backing = COMBOS[name]
    rng = random.Random(name)
    img = d / f"{name}.qcow2"
    backing = []
    if with_backing:
        base = d / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
        qemu_io(base, random_io_cmds(rng, size, 10, zeroes=False))
        backing = ["-b", base.name, "-F", "qcow2"]
    if compress:
        src = d / "src.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(src), str(size))
        qemu_io(src, [f"write -P {i + 1} {i * 300 * 1024} 250k" for i in range(size // (300 * 1024))])
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, str(src), str(img))
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *backing, str(img), str(size))
    for s in snaps:
        qemu_io(img, random_io_cmds(rng, size, 8))
        run("qemu-img", "snapshot", "-c", s, str(img))
    qemu_io(img, random_io_cmds(rng, size, 6))
    return img


@pytest.mark.parametrize("combo", list(COMBOS))
async def test_combo_round_trip(exportd: Exportd, workdir: Path, combo: str) -> None:
    img = await athread(make_combo, combo, workdir, timeout=60)
    snaps = COMBOS[combo][2]
    opts = {"discard": "unmap"} if list(COMBOS).index(combo) % 2 == 0 else {}
    await roundtrip(exportd, workdir, img, combo, snapshots=snaps, ops=60, **opts)
