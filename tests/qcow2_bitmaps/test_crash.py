"""kill -9 of a daemon while persistent bitmaps are in use: the image keeps
them marked in use (qemu-img info shows the flag), and on the next open
they are inconsistent: not trusted, refused by clear, enable, disable and
merge with QEMU's text, and removable. Done to exportd and to
qemu-storage-daemon 7.2 alike; the images and the replies after the restart
must be the same."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.qcow2_bitmaps import qb
from tests.support.jobflow import Step, cmd, play
from tests.support.qsd import running_qsd

pytestmark = qb.needs_qsd

MiB = 1 << 20


def before_crash(d: Path) -> list[Step]:
    nbd = d / "nbd.sock"
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q",
            file={"driver": "file", "filename": str(d / "a.qcow2")}),
        qb.bm("add", "new", persistent=True),  # only in memory until a clean close: lost
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qb.qemu_io(nbd, "write 0 64k", "write 5M 1M")),
    ]


def after_crash(d: Path) -> list[Step]:
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q",
            file={"driver": "file", "filename": str(d / "a.qcow2")}),
        qb.QUERY,
        qb.bm("add", "fresh"),
        qb.bm("clear", "b0"), qb.bm("enable", "b0"), qb.bm("disable", "b0"), qb.bm("enable", "off"),
        cmd("block-dirty-bitmap-merge", node="q", target="b0", bitmaps=["fresh"]),
        cmd("block-dirty-bitmap-merge", node="q", target="fresh", bitmaps=["b0"]),
        qb.sha("b0"), qb.sha("off"),
        cmd("block_resize", node_name="q", size=32 * MiB),
        qb.bm("remove", "b0"),
        qb.bm("remove", "off"),
        qb.bm("remove", "fresh"),  # exportd marks growth dirty, QEMU does not (exportd.block.bitmaps)
        cmd("block_resize", node_name="q", size=32 * MiB),
        qb.bm("add", "off", granularity=8192, persistent=True, disabled=True),
        qb.QUERY,
        cmd("blockdev-del", node_name="q"),
    ]


async def crash_qsd(work: Path) -> None:
    sock = work / "qmp.sock"
    async with running_qsd(str(sock)) as proc:
        await play(str(sock), before_crash(work))
        proc.kill()
        proc.wait(15)


async def crash_exportd(work: Path, daemon: Any) -> None:
    d = daemon()
    await play(d.socket, before_crash(work))
    d.proc.kill()
    d.wait()


async def test_kill_9_leaves_bitmaps_in_use(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    results: dict[str, Any] = {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        img = qb.new_image(work, 16 * MiB, "b0", "--disable -g 8192 off")
        qb.run("qemu-io", "-f", "qcow2", "-c", "write 1M 1M", str(img))  # recorded in b0 by qemu-io
        if who == "qsd":
            await crash_qsd(work)
        else:
            await crash_exportd(work, daemon)
        on_disk = qb.image_bitmaps(img)
        assert on_disk == [{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536},
                           {"flags": ["in-use"], "name": "off", "granularity": 8192}], on_disk
        results[who] = on_disk

    # both daemons restarted on each crashed image: the same replies
    replies = {}
    for image_of in ("qsd", "exportd"):
        for who in ("qsd", "exportd"):
            work = tmp_path / f"{who}-on-{image_of}"
            work.mkdir()
            (work / "a.qcow2").write_bytes((tmp_path / image_of / "a.qcow2").read_bytes())
            steps = after_crash(work)
            if who == "qsd":
                async with running_qsd(str(work / "qmp.sock")):
                    got, _ = await play(str(work / "qmp.sock"), steps)
            else:
                d = daemon()
                got, _ = await play(d.socket, steps)
                assert d.terminate() == 0
            cmds = [s for s in steps if s[0] == "cmd"]
            replies[(who, image_of)] = [qb.bitmaps_of(r) if s[1] == "query-named-block-nodes" else r
                                        for s, r in zip(cmds, got, strict=True)]
            # b0 and the inconsistent `off` removed from the image, a new `off` stored
            assert qb.image_bitmaps(work / "a.qcow2") == [{"flags": [], "name": "off", "granularity": 8192}]
            qb.run("qemu-img", "check", str(work / "a.qcow2"))
    first = replies[("qsd", "qsd")]
    for key, got in replies.items():
        assert got == first, json.dumps([key, got, first])
    # what QEMU says: inconsistent, not recording, refused
    q = first[1]["q"]
    assert {b["name"]: (b.get("inconsistent"), b["recording"]) for b in q} == {
        "b0": (True, False), "off": (True, False)}
    assert first[3] == {"error": ["GenericError", "Bitmap 'b0' is inconsistent and cannot be used"]}
    assert first[11] == {"error": ["GenericError", "Bitmap 'b0' is inconsistent and cannot be used"]}
    assert first[15] == {"return": {}}
    assert [b["name"] for b in first[-2]["q"]] == ["off"]


async def test_in_use_is_on_disk_before_the_first_write(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    """exportd sets IN_USE at open, before any guest write can land."""
    img = qb.new_image(tmp_path / "w", MiB, "b0")
    assert qb.image_bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    d = daemon()
    client = QMPClient("t")
    await client.connect(d.socket)
    try:
        await client.execute("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                              "file": {"driver": "file", "filename": str(img)}})
        assert qb.image_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}]
        await client.execute("blockdev-del", {"node-name": "q"})
        assert qb.image_bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    finally:
        await client.disconnect()
    await asyncio.sleep(0)
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def backups_after_crash(d: Path) -> list[Step]:
    """Backups that would use the inconsistent bitmaps: refused with QEMU's
    text (and no job made); once b0 is removed a full backup runs."""
    b = {"device": "q", "target": "t"}
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q",
            file={"driver": "file", "filename": str(d / "a.qcow2")}),
        cmd("blockdev-add", driver="qcow2", node_name="t",
            file={"driver": "file", "filename": str(d / "t.qcow2")}),
        cmd("blockdev-backup", job_id="i", sync="incremental", bitmap="b0", **b),
        cmd("blockdev-backup", job_id="i", sync="bitmap", bitmap="off", bitmap_mode="always", **b),
        cmd("blockdev-backup", job_id="i", sync="full", bitmap="b0", bitmap_mode="on-success", **b),
        cmd("drive-backup", job_id="i", device="q", target=str(d / "d.qcow2"), sync="incremental", bitmap="b0",
            mode="existing", format="qcow2"),
        cmd("query-block-jobs"),
        qb.bm("remove", "b0"),
        cmd("blockdev-backup", job_id="f", sync="full", **b),
        ("wait", "JOB_STATUS_CHANGE", {"id": "f", "status": "null"}),
        cmd("blockdev-del", node_name="t"),
        cmd("blockdev-del", node_name="q"),
    ]


async def test_inconsistent_bitmap_refused_by_backup(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    replies = {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        img = qb.new_image(work, 16 * MiB, "b0", "--disable -g 8192 off")
        for name in ("t", "d"):
            qb.run("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), str(16 * MiB))
        if who == "qsd":
            await crash_qsd(work)
        else:
            await crash_exportd(work, daemon)
        assert [b["flags"][0] for b in qb.image_bitmaps(img)] == ["in-use", "in-use"]
        replies[who] = await qb.replies_on(who, work / "again.sock", backups_after_crash(work), daemon)
        qb.run("qemu-img", "compare", str(img), str(work / "t.qcow2"))
    assert replies["exportd"] == replies["qsd"], json.dumps(replies)
    refused = {"error": ["GenericError", "Bitmap 'b0' is inconsistent and cannot be used"]}
    assert replies["qsd"][2] == refused and replies["qsd"][4] == refused and replies["qsd"][5] == refused
    assert replies["qsd"][3] == {"error": ["GenericError", "Bitmap 'off' is inconsistent and cannot be used"]}
