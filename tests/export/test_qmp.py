"""block-export-add/del and query-block-exports over QMP against a real
exportd: QEMU's error texts verbatim, newest-first listing, the id free only
after BLOCK_EXPORT_DELETED, one event per export on quit, --export on the
command line, and the mountpoint case that deadlocks QEMU."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.mounts import fuse_mounts_under
from tests.support.programs import arun
from tests.support.threads import athread


async def test_error_texts(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    img = workdir / "img.raw"
    make_image(img, 1 << 20)
    mnt = workdir / "mnt.raw"
    mnt.touch()
    await d.blockdev_file("f", img)
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True})

    def add(**kw: object) -> dict[str, object]:
        args = {"type": "fuse", "id": "e", "node-name": "f", "mountpoint": str(mnt)}
        args.update(kw)
        return args

    assert await d.error("block-export-add", add(**{"node-name": "nope"})) == (
        "Cannot find device='' nor node-name='nope'"
    )
    assert await d.error("block-export-add", add(**{"node-name": "ro", "writable": True})) == (
        "Cannot export read-only node as writable"
    )
    assert await d.error("block-export-add", add(id="-bad")) == "Invalid block export id"
    await d.cmd("block-export-add", add())
    assert await d.error("block-export-add", add(mountpoint=str(workdir / "other"))) == (
        "Block export id 'e' is already in use"
    )
    assert await d.error("block-export-del", {"id": "nope"}) == "Export 'nope' is not found"
    # a failed add left nothing: only 'e' is listed, and it is listed once
    assert [e["id"] for e in await d.exports()] == ["e"]
    assert len(fuse_mounts_under(str(workdir))) == 1
    await d.del_export("e")
    assert await d.exports() == []
    assert fuse_mounts_under(str(workdir)) == []
    await d.cmd("blockdev-del", {"node-name": "f"})  # no export holds it any more


async def test_query_newest_first_and_id_reuse(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    for name in ("one", "two", "three"):
        (workdir / name).touch()
        await d.add_export(name, "n", workdir / name)
    got = await d.exports()
    assert [(e["id"], e["type"], e["node-name"], e["shutting-down"]) for e in got] == [
        ("three", "fuse", "n", False),
        ("two", "fuse", "n", False),
        ("one", "fuse", "n", False),
    ]
    assert got[0]["mountpoint"] == str(workdir / "three")
    await d.cmd("block-export-del", {"id": "two"})
    assert await d.event("BLOCK_EXPORT_DELETED") == {"id": "two"}
    # after the event the id and the mountpoint can be used again at once
    await d.add_export("two", "n", workdir / "two", writable=True)
    assert [e["id"] for e in await d.exports()] == ["two", "three", "one"]


async def test_quit_deletes_every_export(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    for i in range(4):
        (workdir / f"m{i}").touch()
        await d.add_export(f"e{i}", "n", workdir / f"m{i}")
    await d.cmd("quit")
    # QEMU's order (iotest 308): SHUTDOWN, then one BLOCK_EXPORT_DELETED per export
    seen = [await asyncio.wait_for(d.events.get(), 15) for _ in range(5)]
    assert seen[0]["event"] == "SHUTDOWN"
    assert seen[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert all(ev["event"] == "BLOCK_EXPORT_DELETED" for ev in seen[1:])
    assert sorted(ev["data"]["id"] for ev in seen[1:]) == ["e0", "e1", "e2", "e3"]
    await d.disconnect()
    assert d.proc is not None and await asyncio.to_thread(d.proc.wait, 20) == 0
    assert fuse_mounts_under(str(workdir)) == []


async def test_sigterm_unmounts_everything(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    for i in range(3):
        (workdir / f"m{i}").touch()
        await d.add_export(f"e{i}", "n", workdir / f"m{i}")
    assert d.proc is not None
    d.proc.terminate()
    assert await asyncio.to_thread(d.proc.wait, 20) == 0
    assert fuse_mounts_under(str(workdir)) == []


async def test_relative_and_absolute_mountpoint_no_deadlock(exportd: Exportd, workdir: Path) -> None:
    """QEMU hangs forever here (it stats its own mount on its only thread)."""
    d = exportd
    img = workdir / "img.raw"
    make_image(img, 1 << 20)
    (workdir / "mnt.raw").touch()
    await d.blockdev_file("f", img)
    await d.add_export("abs", "f", workdir / "mnt.raw")
    # the daemon runs in workdir: "mnt.raw" is the same file
    assert os.readlink(f"/proc/{d.pid}/cwd") == str(workdir)
    for spelling in ("mnt.raw", "./mnt.raw", str(workdir / "." / "mnt.raw")):
        desc = await asyncio.wait_for(
            d.error(
                "block-export-add",
                {"type": "fuse", "id": "rel", "node-name": "f", "mountpoint": spelling},
            ),
            30,
        )
        assert desc == f"There already is a FUSE export on '{spelling}'"
    # still serving: QMP answers and the mount reads
    await asyncio.wait_for(d.cmd("query-version"), 5)
    data = await athread((workdir / "mnt.raw").read_bytes)
    assert data == img.read_bytes()


async def test_export_on_the_command_line(workdir: Path) -> None:
    img = workdir / "img.raw"
    data = make_image(img, 1 << 20)
    (workdir / "mnt.raw").touch()
    d = Exportd(workdir)
    await d.start(
        "--blockdev", f"driver=file,node-name=f,filename={img}",
        "--export", f"type=fuse,id=cli,node-name=f,mountpoint={workdir / 'mnt.raw'},writable=on",
    )
    try:
        exports = await d.exports()
        assert [(e["id"], e["writable"]) for e in exports] == [("cli", True)]
        assert await athread((workdir / "mnt.raw").read_bytes) == data
    finally:
        await d.stop()
    assert fuse_mounts_under(str(workdir)) == []


async def test_export_on_the_command_line_failure(workdir: Path) -> None:
    r = await arun(
        [sys.executable, "-m", "exportd", "--socket", str(workdir / "s"),
         "--blockdev", "driver=null-co,node-name=n",
         "--export", f"type=fuse,id=x,node-name=n,mountpoint={workdir / 'missing'}"],
        timeout=30,
    )
    assert r.returncode == 1
    assert f"Failed to stat '{workdir / 'missing'}': No such file or directory" in r.stderr


async def test_safe_and_hard_delete_with_a_request_in_flight(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    # a backend that takes 30 s per request: a read stays in flight
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "slow", "size": 1 << 20,
                                 "latency-ns": 30_000_000_000})
    mnt = workdir / "slow.raw"
    mnt.touch()
    await d.add_export("busy", "slow", mnt)
    opened = threading.Event()
    tid: list[int] = []
    outcome: list[object] = []

    def reader() -> None:
        tid.append(threading.get_native_id())
        try:
            with open(mnt, "rb", buffering=0) as f:
                opened.set()
                outcome.append(len(f.read(4096)))
        except OSError as e:
            outcome.append(e.errno)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    await asyncio.to_thread(opened.wait, 10)
    # wait until the reader sleeps in the kernel waiting for the daemon's answer
    for _ in range(200):
        with open(f"/proc/self/task/{tid[0]}/wchan") as w:
            if w.read() == "request_wait_answer":
                break
        await asyncio.sleep(0.02)
    # the daemon reads it within milliseconds; a second of margin for a loaded
    # machine (fusectl, which would show it, is not mounted here)
    await asyncio.sleep(1.0)
    assert await d.error("block-export-del", {"id": "busy"}) == "export 'busy' still in use"
    assert [e["shutting-down"] for e in await d.exports()] == [False]
    await d.cmd("block-export-del", {"id": "busy", "mode": "hard"})
    assert await d.event("BLOCK_EXPORT_DELETED") == {"id": "busy"}
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive() and outcome and outcome[0] != 4096
    assert await d.exports() == [] and fuse_mounts_under(str(workdir)) == []
