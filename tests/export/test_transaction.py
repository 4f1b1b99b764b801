"""QMP transaction: the same replies as qemu-storage-daemon 7.2 for the
same script (successes, each kind of failure, completion-mode grouped), a
failed transaction leaves the graph exactly as it was, and a FUSE export
that moves in a successful one stays mounted and writes to the overlay
(while after a rolled-back one it writes to its old node again)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.export.test_snapshot import allocated_in
from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of, running_qsd
from tests.support.threads import athread

MiB = 1 << 20


def images(d: Path) -> None:
    for p in d.glob("*.qcow2"):
        p.unlink()
    for name in ("base", "b2", "ovl", "ovl2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / f"{name}.qcow2"), str(MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(d / "base.qcow2")],
                   check=True, capture_output=True)
    for m in ("mnt.raw", "mnt2.raw"):
        (d / m).touch()


def qcow2(d: Path, name: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", {"driver": "qcow2", "node-name": name, **extra,
                             "file": {"driver": "file", "filename": str(d / f"{name}.qcow2"),
                                      "node-name": f"{name}-file"}})


def snap(node: str, overlay: str) -> dict[str, Any]:
    return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}


def sync(d: Path, node: str, new: str, **extra: Any) -> dict[str, Any]:
    return {"type": "blockdev-snapshot-sync",
            "data": {"node-name": node, "snapshot-file": str(d / f"{new}.qcow2"), "snapshot-node-name": new, **extra}}


ABORT = {"type": "abort", "data": {}}


def txn(*actions: dict[str, Any], **props: Any) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"actions": list(actions)}
    if props:
        args["properties"] = props
    return ("transaction", args)


def setup(d: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        qcow2(d, "base"), qcow2(d, "b2"),
        qcow2(d, "ovl", backing=None), qcow2(d, "ovl2", backing=None),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "base", "writable": True,
                              "mountpoint": str(d / "mnt.raw")}),
        ("block-export-add", {"type": "fuse", "id": "e2", "node-name": "b2", "writable": True,
                              "mountpoint": str(d / "mnt2.raw")}),
    ]


def failing(d: Path) -> list[tuple[str, dict[str, Any]]]:
    """Transactions that fail, each after a first action that succeeded."""
    return [
        txn(ABORT),
        txn(snap("base", "ovl"), ABORT),
        txn(snap("base", "ovl"), sync(d, "nope", "s1")),  # a second action on an unknown node
        txn(sync(d, "base", "s1"), sync(d, "b2", "s1")),  # duplicate snapshot-node-name
        txn(snap("base", "ovl"), snap("base", "ovl2")),  # base is now ovl's backing node
        txn(snap("base", "ovl"), snap("b2", "ovl")),  # ovl already has a backing image
        txn(snap("b2", "base")),  # overlay in use by an export
        txn(snap("b2", "ovl-file")),  # overlay in use by a node
        txn(sync(d, "base", "s1"), snap("b2", "s1")),  # overlay in use since the first action
        txn(snap("base", "ovl"), **{"completion-mode": "grouped"}),
        txn(ABORT, **{"completion-mode": "grouped"}),
        ("transaction", {"actions": [{"type": "abort"}]}),
        ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {"node": "base"}}]}),
        ("transaction", {"actions": [{"data": {}}]}),
    ]


def script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        *setup(d),
        ("query-block", {}),
        txn(),
        *failing(d),
        # two snapshots of two nodes in one transaction
        txn(snap("base", "ovl"), sync(d, "b2", "s2")),
        ("query-block-exports", {}),
        # rolled back after a success: s3's image is created and stays
        txn(sync(d, "ovl", "s3"), snap("s2", "ovl2"), ABORT),
        txn(sync(d, "ovl", "s3", mode="existing"), snap("s2", "ovl2")),
        ("query-block", {}),
    ]


def comparable(step: tuple[str, dict[str, Any]], reply: Any) -> Any:
    # exportd's BlockExportInfo has extra members (README, Exports)
    if step[0] == "query-block-exports":
        return [(e["id"], e["node-name"]) for e in reply["return"]]
    return reply


async def graph_facts(socket_path: str) -> tuple[list[str], list[str]]:
    """The named nodes and the (parent, child, role) edges between them,
    once every export is deleted (QMP, either daemon)."""
    client = QMPClient("facts")
    await client.connect(socket_path)
    try:
        for export_id in ("e", "e2"):
            await client.execute("block-export-del", {"id": export_id})
        for _ in range(100):
            if not await client.execute("query-block-exports"):
                break
            await asyncio.sleep(0.05)
        nodes = await client.execute("query-named-block-nodes")
        graph = await client.execute("x-debug-query-block-graph")
    finally:
        await client.disconnect()
    names = {n["id"]: auto(n["name"]) for n in graph["nodes"]}
    edges = sorted(f"{names[e['parent']]} -{e['name']}-> {names[e['child']]}" for e in graph["edges"])
    return sorted(auto(n["node-name"]) for n in nodes), edges


def auto(name: str) -> str:
    """Automatic node names count differently in each daemon."""
    return "#auto" if name.startswith("#") else name


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_transaction_same_as_qemu(daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    steps = script(work)
    images(work)
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
        theirs_facts = await graph_facts(str(tmp_path / "qsd.sock"))
    theirs_files = sorted(p.name for p in work.glob("*.qcow2"))
    images(work)
    d = daemon()
    ours = await replies_of(d.socket, steps)
    ours_facts = await graph_facts(d.socket)
    d.terminate()
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        assert comparable(step, a) == comparable(step, b), (i, step)
    assert ours_facts == theirs_facts
    assert sorted(p.name for p in work.glob("*.qcow2")) == theirs_files
    # the script did what it says: both exports moved, one rollback left s3's file
    assert comparable(steps[-4], ours[-4]) == [("e2", "s2"), ("e", "ovl")]
    assert "s3.qcow2" in theirs_files and "s1.qcow2" in theirs_files
    assert sum("error" in r for r in theirs) == len(failing(work)) + 1


async def test_a_failed_transaction_changes_nothing(exportd: Exportd, workdir: Path) -> None:
    images(workdir)
    for args in setup(workdir):
        await exportd.cmd(*args)
    before = (await exportd.cmd("query-named-block-nodes"), await exportd.cmd("x-debug-query-block-graph"),
              await exportd.exports())
    try:
        for step in failing(workdir):
            with pytest.raises(Exception):  # noqa: B017 (each kind of failure)
                await exportd.cmd(*step)
            after = (await exportd.cmd("query-named-block-nodes"),
                     await exportd.cmd("x-debug-query-block-graph"), await exportd.exports())
            assert after == before, step
    finally:
        await exportd.del_export("e")
        await exportd.del_export("e2")


async def test_exports_move_in_a_transaction_and_back_on_abort(exportd: Exportd, workdir: Path) -> None:
    images(workdir)
    for args in setup(workdir)[:4]:
        await exportd.cmd(*args)
    mnt = workdir / "mnt.raw"
    await exportd.add_export("e", "base", mnt, writable=True)
    fd = await athread(os.open, str(mnt), os.O_RDWR)
    try:
        # rolled back: the export went to ovl and came back to base
        with pytest.raises(Exception, match="Abort action"):
            await exportd.cmd(*txn(snap("base", "ovl"), ABORT))
        assert [(e["id"], e["node-name"]) for e in await exportd.exports()] == [("e", "base")]
        assert await athread(os.pwrite, fd, b"c" * 4096, MiB - 4096) == 4096
        await athread(os.fsync, fd)
        # then for real, together with an implicit overlay of an unused node
        await exportd.cmd(*txn(snap("base", "ovl"), sync(workdir, "b2", "s2")))
        assert [(e["id"], e["node-name"]) for e in await exportd.exports()] == [("e", "ovl")]
        assert any(line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines())
        assert await athread(os.pread, fd, 4096, 8192) == b"a" * 4096  # through the backing node
        assert await athread(os.pwrite, fd, b"b" * 65536, 0) == 65536
        await athread(os.fsync, fd)
        assert await athread(os.pread, fd, 65536 + 4096, 0) == b"b" * 65536 + b"a" * 4096
        nodes = sorted(n["node-name"] for n in await exportd.cmd("query-named-block-nodes"))
        assert "s2" not in nodes  # nothing used b2: its overlay went at once, as in QEMU
    finally:
        await athread(os.close, fd)
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "ovl"})
    for node in ("base", "b2"):
        await exportd.cmd("blockdev-del", {"node-name": node})
    assert allocated_in(workdir / "ovl.qcow2") == [(0, 65536)]
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x61 0 1020k", "-c",
                        f"read -P 0x63 {MiB - 4096} 4k", str(workdir / "base.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    for image in ("ovl.qcow2", "base.qcow2", "s2.qcow2"):
        assert subprocess.run(["qemu-img", "check", "-q", str(workdir / image)]).returncode == 0
