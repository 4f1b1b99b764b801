"""Persistent dirty bitmaps in qcow2 against qemu-storage-daemon 7.2.

Each daemon runs the same QMP script on its own copy of the same images
(persistent bitmaps added, writes through an NBD export recorded, one
removed, the node closed and opened again, then opened read-only); replies,
bitmap lists, counts and sha256 hashes must be the same. Then the images
change hands: each daemon loads the image the other one wrote, and qemu-img
check, info and `bitmap --merge` see the same thing in both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.qcow2_bitmaps import qb
from tests.support.jobflow import Step, cmd

pytestmark = qb.needs_qsd

MiB = 1 << 20


def make_images(d: Path) -> None:
    qb.run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "a.qcow2"), str(64 * MiB))
    # a bitmap made by qemu-img, with writes qemu-io recorded in it
    qb.run("qemu-img", "bitmap", "--add", "-g", "16384", str(d / "a.qcow2"), "old")
    qb.run("qemu-io", "-f", "qcow2", "-c", "write 1M 100k", "-c", "write 63M 1M", str(d / "a.qcow2"))
    qb.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), str(MiB))
    qb.run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "big.qcow2"), str(4 << 40))


NAMES = ("old", "p1", "p2", "p3", "x" * 1023)


def add_q(d: Path, read_only: bool = False) -> Step:
    return cmd("blockdev-add", driver="qcow2", node_name="q", read_only=read_only,
               file={"driver": "file", "filename": str(d / "a.qcow2")})


def loading_script(d: Path) -> list[Step]:
    """Open a.qcow2 read-only and look at every bitmap."""
    return [add_q(d, read_only=True), qb.QUERY, *[qb.sha(n) for n in NAMES if n != "p3"], cmd("blockdev-del", node_name="q")]


def script(d: Path, nbd: Path) -> list[Step]:
    return [
        add_q(d),
        cmd("blockdev-add", driver="qcow2", node_name="v2",
            file={"driver": "file", "filename": str(d / "v2.qcow2")}),
        cmd("blockdev-add", driver="qcow2", node_name="big",
            file={"driver": "file", "filename": str(d / "big.qcow2")}),
        qb.QUERY, qb.sha("old"),
        qb.bm("add", "p1", persistent=True),
        qb.bm("add", "p2", persistent=True, granularity=4096, disabled=True),
        qb.bm("add", "p3", persistent=True, granularity=512),
        qb.bm("add", "x" * 1023, persistent=True, granularity=1 << 20),
        qb.bm("add", "t", granularity=8192),
        qb.bm("add", "p1", persistent=True),
        qb.bm("add", "old", persistent=True),
        qb.bm("add", "v", node="v2", persistent=True),
        qb.bm("add", "v", node="v2"),
        qb.bm("add", "huge", node="big", persistent=True, granularity=512),
        qb.bm("add", "fine", node="big", persistent=True, granularity=1 << 20),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qb.qemu_io(nbd, "write 0 1", "write 100000 70000", "write -z 8M 1M",
                                 "discard 30M 64k", "write 33554000 4096", "write 67108000 864")),
        qb.QUERY, *[qb.sha(n) for n in (*NAMES, "t")],
        qb.bm("enable", "p2"),
        ("call", lambda: qb.qemu_io(nbd, "write 40M 3000")),
        qb.bm("disable", "p1"),
        ("call", lambda: qb.qemu_io(nbd, "write 50M 512")),
        cmd("block-dirty-bitmap-merge", node="q", target="p3", bitmaps=["old"]),
        qb.bm("remove", "p3"),
        qb.bm("add", "p4", persistent=True),
        qb.bm("remove", "p4"),
        qb.QUERY, *[qb.sha(n) for n in NAMES],
        cmd("block-export-del", id="e"),
        cmd("nbd-server-stop"),
        cmd("blockdev-del", node_name="q"),
        # stored at close: loaded again as they were (p3 is gone for good)
        add_q(d), qb.QUERY, *[qb.sha(n) for n in NAMES],
        qb.bm("clear", "old"),
        cmd("blockdev-del", node_name="q"),
        # read-only: the bitmaps are there, readonly
        add_q(d, read_only=True), qb.QUERY, *[qb.sha(n) for n in NAMES],
        qb.bm("clear", "p1"), qb.bm("remove", "p1"), qb.bm("disable", "p2"), qb.bm("enable", "p1"),
        cmd("block-dirty-bitmap-merge", node="q", target="p1", bitmaps=["p2"]),
        qb.bm("add", "new", persistent=True),
        cmd("blockdev-del", node_name="q"),
        cmd("blockdev-del", node_name="v2"),
        cmd("blockdev-del", node_name="big"),
    ]


async def test_persistent_bitmaps_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    results: dict[str, list[Any]] = {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        work.mkdir()
        make_images(work)
        steps = script(work, work / "nbd.sock")
        results[who] = await qb.replies_on(who, work / "qmp.sock", steps, daemon)
        qb.run("qemu-img", "check", str(work / "a.qcow2"))
    cmds = [s for s in script(tmp_path, tmp_path) if s[0] == "cmd"]
    for step, ours, theirs in zip(cmds, results["exportd"], results["qsd"], strict=True):
        assert ours == theirs, json.dumps([step[1], ours, theirs])
    assert qb.image_bitmaps(tmp_path / "exportd" / "a.qcow2") == qb.image_bitmaps(tmp_path / "qsd" / "a.qcow2")

    # each daemon loads the image the other wrote, and its own: all the same
    loads = []
    for who in ("qsd", "exportd"):
        for image_of in ("qsd", "exportd"):
            d = tmp_path / image_of
            steps = loading_script(d)
            loads.append(await qb.replies_on(who, tmp_path / f"load-{who}.sock", steps, daemon))
    assert all(x == loads[0] for x in loads), loads
    assert "error" not in json.dumps(loads[0])

    # qemu-img bitmap works on exportd's image: merge one of its bitmaps
    # into a new one (as qemu-img writes it) and exportd reads back the bits
    ours = tmp_path / "exportd" / "a.qcow2"
    qb.run("qemu-img", "bitmap", "--add", str(ours), "merged")
    qb.run("qemu-img", "bitmap", "--merge", "p1", "--disable", str(ours), "merged")
    qb.run("qemu-img", "bitmap", "--remove", str(ours), "old")
    qb.run("qemu-img", "check", str(ours))
    steps = [add_q(tmp_path / "exportd", read_only=True), qb.sha("p1"), qb.sha("merged"), qb.QUERY]
    replies = await qb.replies_on("exportd", tmp_path / "merge.sock", steps, daemon)
    assert replies[1] == replies[2] and "return" in replies[1]
    names = [b["name"] for b in replies[3]["q"]]
    assert "merged" in names and "old" not in names


async def test_resized_image_stores_bitmaps_at_the_new_size(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    """block_resize with persistent bitmaps: they are stored at the new size
    (exportd and qemu-storage-daemon load the same bits back). Not compared
    with QEMU's own resize: exportd marks the grown range dirty, QEMU does
    not (exportd.block.bitmaps.node_resized)."""
    make_images(tmp_path)
    nbd = tmp_path / "nbd.sock"
    before = [
        add_q(tmp_path),
        qb.bm("add", "p", persistent=True, granularity=4096),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qb.qemu_io(nbd, "write 0 1", "write 63M 1M")),
        cmd("block-export-del", id="e"),
        ("sleep", 0.2),
        cmd("block_resize", node_name="q", size=100 * MiB),
        qb.sha("p"), qb.sha("old"),
        cmd("blockdev-del", node_name="q"),
    ]
    replies = await qb.replies_on("exportd", tmp_path / "a.sock", before, daemon)
    assert all("return" in r for r in replies), replies
    qb.run("qemu-img", "check", str(tmp_path / "a.qcow2"))
    after = [add_q(tmp_path, read_only=True), qb.sha("p"), qb.sha("old")]
    for who in ("exportd", "qsd"):
        got = await qb.replies_on(who, tmp_path / f"{who}.sock", after, daemon)
        assert got[1:] == replies[-3:-1], (who, got, replies)
