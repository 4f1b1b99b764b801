"""block_resize: the same replies and images as qemu-storage-daemon, and an
export on the resized node (or on a node above it) sees the new size at once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of, running_qsd
from tests.support.threads import athread

MiB = 1 << 20


def script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(d / "r.img")}),
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(d / "q.qcow2")}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f1"}),
        ("blockdev-add", {"driver": "file", "node-name": "ro", "filename": str(d / "ro.img"),
                          "read-only": True}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
        ("block_resize", {"node-name": "f0", "size": 2 * MiB}),
        ("block_resize", {"node-name": "q", "size": 4 * MiB}),
        ("block_resize", {"node-name": "q", "size": 3 * MiB}),  # shrink, nothing written there
        ("block_resize", {"node-name": "f0", "size": MiB + 4096}),
        ("block_resize", {"node-name": "nope", "size": MiB}),
        ("block_resize", {"device": "d0", "size": MiB}),
        ("block_resize", {"size": MiB}),
        ("block_resize", {"node-name": "f0", "size": -1}),
        ("block_resize", {"node-name": "ro", "size": 2 * MiB}),
        ("block_resize", {"node-name": "n", "size": 2 * MiB}),
        ("block_resize", {"node-name": "f0"}),
        ("block_resize", {"node-name": "f0", "size": "1M"}),
    ]


def fresh(d: Path) -> None:
    for name in ("r.img", "ro.img", "q.qcow2"):
        (d / name).unlink(missing_ok=True)
    (d / "r.img").write_bytes(b"r" * MiB)
    (d / "ro.img").write_bytes(b"o" * MiB)
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "q.qcow2"), str(MiB)])
    assert r.returncode == 0



def virtual_size(img: Path) -> int:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)["virtual-size"]


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_block_resize_same_as_qemu(daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    steps = script(work)
    fresh(work)
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
    theirs_sizes = (os.path.getsize(work / "r.img"), virtual_size(work / "q.qcow2"))
    fresh(work)
    d = daemon()
    ours = await replies_of(d.socket, steps)
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        assert a == b, (i, step)
    d.terminate()
    assert (os.path.getsize(work / "r.img"), virtual_size(work / "q.qcow2")) == theirs_sizes
    assert theirs_sizes == (MiB + 4096, 3 * MiB)
    assert subprocess.run(["qemu-img", "check", "-q", str(work / "q.qcow2")]).returncode == 0


async def test_exports_see_the_new_size_at_once(exportd: Exportd, workdir: Path) -> None:
    (workdir / "r.img").write_bytes(b"r" * MiB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "q.qcow2"), str(MiB)],
                   check=True)
    await exportd.blockdev_file("f0", workdir / "r.img")
    await exportd.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0"})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                       "file": {"driver": "file", "filename": str(workdir / "q.qcow2")}})
    for name in ("r", "q"):
        (workdir / f"{name}.raw").touch()
        await exportd.add_export(name, name, workdir / f"{name}.raw", writable=True)
    r_mnt, q_mnt = str(workdir / "r.raw"), str(workdir / "q.raw")
    # each export is its node's only writer: the kernel caches the size for a second
    assert (await athread(os.stat, r_mnt)).st_size == MiB
    assert (await athread(os.stat, q_mnt)).st_size == MiB

    await exportd.cmd("block_resize", {"node-name": "q", "size": 5 * MiB})
    await exportd.cmd("block_resize", {"node-name": "f0", "size": 3 * MiB})  # below the raw node

    assert (await athread(os.stat, q_mnt)).st_size == 5 * MiB
    assert (await athread(os.stat, r_mnt)).st_size == 3 * MiB

    def read_tail(path: str, offset: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()

    assert await athread(read_tail, q_mnt, 5 * MiB - 4096) == bytes(4096)  # grown: zeroes
    assert await athread(read_tail, r_mnt, MiB - 1) == b"r" + bytes(2 * MiB)
