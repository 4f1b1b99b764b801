"""Persistent bitmaps are stored when the daemon quits (QMP `quit`, the
node never deleted): `qemu-img info` lists them, not in use, and a restarted
daemon loads them with the bits they had. Done to exportd and to
qemu-storage-daemon 7.2 alike; the replies and the stored bitmaps must be
the same."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.qcow2_bitmaps import qb
from tests.support.jobflow import Step, cmd, play
from tests.support.qsd import running_qsd

pytestmark = qb.needs_qsd

MiB = 1 << 20


def open_q(d: Path) -> Step:
    return cmd("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(d / "a.qcow2")})


def before_quit(d: Path) -> list[Step]:
    nbd = d / "nbd.sock"
    return [
        open_q(d),
        qb.bm("add", "p", persistent=True),
        qb.bm("add", "g", persistent=True, granularity=8192),
        qb.bm("add", "t"),  # transient: gone after the restart
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qb.qemu_io(nbd, "write 0 64k", "write 5M 1M", "write -z 9M 8k")),
        qb.bm("disable", "g"),
        ("call", lambda: qb.qemu_io(nbd, "write 12M 64k")),
        qb.QUERY, qb.sha("p"), qb.sha("g"), qb.sha("old"),
    ]


async def quit_daemon(sock: str) -> None:
    """QMP quit, from a client of its own (the daemon hangs up on it)."""
    client = QMPClient("quit")
    await client.connect(sock)
    assert await client.execute("quit") == {}
    with contextlib.suppress(EOFError, ConnectionError):
        await client.disconnect()


def after_restart(d: Path) -> list[Step]:
    return [open_q(d), qb.QUERY, qb.sha("p"), qb.sha("g"), qb.sha("old"), cmd("blockdev-del", node_name="q")]


async def quit_on(who: str, work: Path, daemon: Any) -> list[Any]:
    steps = before_quit(work)
    if who == "qsd":
        async with running_qsd(str(work / "qmp.sock")) as proc:
            got, _ = await play(str(work / "qmp.sock"), steps)
            await quit_daemon(str(work / "qmp.sock"))
            assert proc.wait(15) == 0
    else:
        d = daemon()
        got, _ = await play(d.socket, steps)
        await quit_daemon(d.socket)
        assert d.wait() == 0
    cmds = [s for s in steps if s[0] == "cmd"]
    return [qb.bitmaps_of(r) if s[1] == "query-named-block-nodes" else r for s, r in zip(cmds, got, strict=True)]


async def test_bitmaps_stored_on_quit(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    before, after, stored = {}, {}, {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        img = qb.new_image(work, 16 * MiB, "old")
        before[who] = await quit_on(who, work, daemon)
        stored[who] = qb.image_bitmaps(img)
        qb.run("qemu-img", "check", str(img))
        after[who] = await qb.replies_on(who, work / "again.sock", after_restart(work), daemon)
    assert before["exportd"] == before["qsd"], json.dumps(before)
    assert stored["exportd"] == stored["qsd"], json.dumps(stored)
    assert after["exportd"] == after["qsd"], json.dumps(after)
    assert {b["name"]: b["flags"] for b in stored["qsd"]} == {"p": ["auto"], "g": [], "old": ["auto"]}
    # the bits survived: the same hashes before the quit and after the restart
    assert after["exportd"][2:5] == before["exportd"][-3:]
    assert {b["name"] for b in after["exportd"][1]["q"]} == {"p", "g", "old"}
