"""blockdev-snapshot: the same replies as qemu-storage-daemon, and a FUSE
export moves to the overlay with no unmount: a descriptor opened before the
snapshot keeps working, its reads see the old data through the backing
node, and its next write lands in the overlay."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of, replies_of_both, running_qsd
from tests.support.threads import athread

MiB = 1 << 20


def images(d: Path) -> None:
    for name in ("base.qcow2", "ovl.qcow2", "plain.img"):
        (d / name).unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(d / "base.qcow2")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2",
                    str(d / "ovl.qcow2")], check=True)
    (d / "plain.img").write_bytes(bytes(MiB))


def script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": str(d / "base.qcow2")}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "backing": None,
                          "file": {"driver": "file", "filename": str(d / "ovl.qcow2"), "node-name": "ovl-file"}}),
        ("blockdev-add", {"driver": "file", "node-name": "plain", "filename": str(d / "plain.img")}),
        ("blockdev-snapshot", {"node": "nope", "overlay": "ovl"}),
        ("blockdev-snapshot", {"node": "base", "overlay": "nope"}),
        ("blockdev-snapshot", {"node": "base", "overlay": "plain"}),
        ("blockdev-snapshot", {"node": "ovl-file", "overlay": "plain"}),
        ("blockdev-snapshot", {"node": "base", "overlay": "ovl"}),
        ("blockdev-snapshot", {"node": "base", "overlay": "ovl"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-snapshot", {"node": "base"}),
    ]


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_blockdev_snapshot_same_as_qemu(daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    steps = script(work)
    ours, theirs = await replies_of_both(tmp_path, lambda: images(work), steps, lambda: daemon().socket)
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        assert a == b, (i, step)


def allocated_in(image: Path) -> list[tuple[int, int]]:
    """(start, length) of the ranges `image` itself holds data for (qemu-img map)."""
    r = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(image)], capture_output=True,
                       text=True, check=True)
    return [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["data"] and e["depth"] == 0]


async def test_an_open_file_moves_to_the_overlay(exportd: Exportd, workdir: Path) -> None:
    images(workdir)
    for args in script(workdir)[:2]:
        await exportd.cmd(*args)
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "base", mnt, writable=True)
    fd = await athread(os.open, str(mnt), os.O_RDWR)
    try:
        assert await athread(os.pread, fd, 4096, 0) == b"a" * 4096
        await exportd.cmd("blockdev-snapshot", {"node": "base", "overlay": "ovl"})
        exports = await exportd.exports()
        assert [(e["id"], e["node-name"]) for e in exports] == [("e", "ovl")]
        assert await athread(os.pread, fd, 4096, 8192) == b"a" * 4096  # through the backing node
        assert await athread(os.pwrite, fd, b"b" * 65536, 0) == 65536
        await athread(os.fsync, fd)
        assert await athread(os.pread, fd, 65536 + 4096, 0) == b"b" * 65536 + b"a" * 4096
    finally:
        await athread(os.close, fd)
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "ovl"})
    await exportd.cmd("blockdev-del", {"node-name": "base"})
    # the write is in the overlay, the base is as it was
    assert allocated_in(workdir / "ovl.qcow2") == [(0, 65536)]
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x61 0 1M", str(workdir / "base.qcow2")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    for image in ("ovl.qcow2", "base.qcow2"):
        assert subprocess.run(["qemu-img", "check", "-q", str(workdir / image)]).returncode == 0


def sync_script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    s1, s2 = str(d / "s1.qcow2"), str(d / "s2.qcow2")
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": str(d / "base.qcow2")}}),
        # with nothing on it, a node's implicit overlay would go at once (QEMU frees it)
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "base", "writable": True,
                              "mountpoint": str(d / "mnt.raw")}),
        ("blockdev-snapshot-sync", {"node-name": "nope", "snapshot-file": s1}),
        ("blockdev-snapshot-sync", {"device": "nope", "snapshot-file": s1}),
        ("blockdev-snapshot-sync", {"device": "base", "snapshot-file": s1}),  # no device of that name
        ("blockdev-snapshot-sync", {"snapshot-file": s1}),
        ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": str(d / "none.qcow2"),
                                    "mode": "existing"}),
        ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": s1, "snapshot-node-name": "base"}),
        ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": s1, "snapshot-node-name": "s1"}),
        ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": s2}),
        ("blockdev-snapshot-sync", {"node-name": "s1", "snapshot-file": s2, "snapshot-node-name": "s2"}),
        ("blockdev-snapshot-sync", {"node-name": "s2", "snapshot-file": s1, "mode": "bogus"}),
        ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": s2, "snapshot-node-name": "s3"}),
        ("block-export-del", {"id": "e"}),
    ]


async def named_nodes_once_exports_are_gone(socket_path: str) -> list[str]:
    """The named nodes left once every export is deleted (implicit overlays
    go with their last user)."""
    client = QMPClient("nodes")
    await client.connect(socket_path)
    try:
        for _ in range(100):
            if not await client.execute("query-block-exports"):
                break
            await asyncio.sleep(0.05)
        nodes = await client.execute("query-named-block-nodes")
    finally:
        await client.disconnect()
    return sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#"))


def chain_facts(img: Path) -> dict[str, Any]:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)], capture_output=True,
                       text=True, check=True)
    i = json.loads(r.stdout)
    return {k: i.get(k) for k in ("format", "virtual-size", "backing-filename", "backing-filename-format")}


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_blockdev_snapshot_sync_same_as_qemu(daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    steps = sync_script(work)

    def fresh() -> None:
        for p in work.glob("s*.qcow2"):
            p.unlink()
        images(work)
        (work / "mnt.raw").touch()

    fresh()
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
        theirs_left = await named_nodes_once_exports_are_gone(str(tmp_path / "qsd.sock"))
    theirs_chain = [chain_facts(work / n) for n in ("s1.qcow2", "s2.qcow2") if (work / n).exists()]
    fresh()
    d = daemon()
    ours = await replies_of(d.socket, steps)
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        assert a == b, (i, step)
    assert await named_nodes_once_exports_are_gone(d.socket) == theirs_left == ["base"]
    d.terminate()
    assert [chain_facts(work / n) for n in ("s1.qcow2", "s2.qcow2") if (work / n).exists()] == theirs_chain
    assert [c["backing-filename"] for c in theirs_chain] == [str(work / "base.qcow2"), str(work / "s1.qcow2")]
