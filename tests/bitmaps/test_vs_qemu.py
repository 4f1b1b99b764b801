"""Dirty bitmap commands against qemu-storage-daemon 7.2: the same script
(adds, bad input, writes through an NBD export, clear, merge, enable and
disable, transactions that commit and that abort) gives the same replies,
the same query-named-block-nodes bitmap lists, counts and sha256 hashes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobflow import cmd
from tests.support.qsd import QSD, play_on_both

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

MiB = 1 << 20


def images(d: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "a.qcow2"), str(4 * MiB)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "r.raw"), str(4 * MiB + 512)], check=True)


def qemu_io(sock: Path, *commands: str, export: str = "a") -> None:
    """qemu-io's commands on an NBD export (another process writes)."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, f"nbd+unix:///{export}?socket={sock}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def bitmaps_of(reply: dict[str, Any]) -> Any:
    if "return" not in reply:
        return reply
    return {n["node-name"]: n.get("dirty-bitmaps") for n in reply["return"] if not n["node-name"].startswith("#")}


def script(d: Path, nbd: Path) -> list[Any]:
    def bm(verb: str, bitmap: str, node: str = "q", **extra: Any) -> Any:
        return ("cmd", f"block-dirty-bitmap-{verb}", {"node": node, "name": bitmap, **extra})

    def sha(bitmap: str, node: str = "q") -> Any:
        return ("cmd", "x-debug-block-dirty-bitmap-sha256", {"node": node, "name": bitmap})

    query = cmd("query-named-block-nodes", flat=True)
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q",
            file={"driver": "file", "filename": str(d / "a.qcow2")}),
        cmd("blockdev-add", driver="file", node_name="r", filename=str(d / "r.raw")),
        bm("add", "b1"),
        bm("add", "small", granularity=512),
        bm("add", "off", disabled=True),
        bm("add", "b1"),
        bm("add", ""),
        bm("add", "x" * 1024),
        bm("add", "x" * 1023, granularity=1 << 31),
        bm("add", "g", granularity=1000),
        bm("add", "g", granularity=256),
        bm("add", "g", granularity=1 << 32),
        bm("add", "g", node="nope"),
        bm("add", "p", node="r", persistent=True),
        bm("add", "rb", node="r"),
        bm("remove", "zz"), bm("clear", "zz"), bm("enable", "zz"), bm("disable", "zz"),
        bm("remove", "b1", node="nope"),
        sha("nope"),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qemu_io(nbd, "write 0 1", "write 100000 70000", "write -z 1M 64k",
                                 "discard 3M 4096", "write 4194000 304")),
        query, sha("b1"), sha("small"), sha("off"), sha("x" * 1023),
        bm("enable", "off"),
        ("call", lambda: qemu_io(nbd, "write 2M 512")),
        bm("disable", "off"), bm("disable", "off"),
        ("call", lambda: qemu_io(nbd, "write 2500k 512")),
        query, sha("off"),
        cmd("block-dirty-bitmap-merge", node="q", target="off", bitmaps=["b1", {"node": "q", "name": "small"}]),
        cmd("block-dirty-bitmap-merge", node="q", target="off", bitmaps=[{"node": "r", "name": "rb"}]),
        cmd("block-dirty-bitmap-merge", node="q", target="off", bitmaps=["b1", "nope"]),
        cmd("block-dirty-bitmap-merge", node="q", target="nope", bitmaps=[]),
        query, sha("off"),
        bm("clear", "b1"),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "t1"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "small"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "q", "name": "x" * 1023}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "q", "target": "off", "bitmaps": ["small"]}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "q", "name": "b1"}},
            {"type": "abort", "data": {}}]),
        query, sha("small"), sha("off"),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "t1", "granularity": 4096}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "q", "target": "t1", "bitmaps": ["small"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "small"}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "q", "name": "b1"}}]),
        query, sha("t1"),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "t2"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "t2"}}]),
        query,
        cmd("block-export-del", id="e"),
        cmd("nbd-server-stop"),
    ]


async def replies_as_qemu(daemon, tmp_path: Path, prepare: Any, make_script: Any) -> tuple[list, list]:  # noqa: ANN001
    """Play `make_script(dir, nbd_socket)` on both daemons (each directory
    made by `prepare`) and require the same replies, bitmaps compared by
    bitmaps_of(); returns exportd's replies and the script's commands."""
    both = await play_on_both(tmp_path, daemon, prepare, lambda d, out: make_script(d, d / "nbd.sock"))
    theirs, ours = both["qsd"][0], both["exportd"][0]
    cmds = [s for s in make_script(tmp_path, tmp_path) if s[0] == "cmd"]
    for step, a, b in zip(cmds, ours, theirs, strict=True):
        if step[1] == "query-named-block-nodes":
            a, b = bitmaps_of(a), bitmaps_of(b)
        assert a == b, (step, a, b)
    return ours, cmds


async def test_bitmap_commands_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    await replies_as_qemu(daemon, tmp_path, images, script)


def test_merge_of_no_bitmaps(daemon, raw_qmp, tmp_path: Path) -> None:  # noqa: ANN001
    """An empty source list merges nothing (qemu-storage-daemon 7.2 dies of
    SIGSEGV on it, so this one is exportd alone); the target is still checked."""
    c = raw_qmp(daemon())
    c.negotiate()
    images(tmp_path)
    assert c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                  "file": {"driver": "file", "filename": str(tmp_path / "a.qcow2")}}) == {"return": {}}
    assert c.cmd("block-dirty-bitmap-add", {"node": "q", "name": "b"}) == {"return": {}}
    assert c.cmd("block-dirty-bitmap-merge", {"node": "q", "target": "b", "bitmaps": []}) == {"return": {}}
    assert c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}}) == {
        "return": {}}
    assert c.cmd("block-dirty-bitmap-disable", {"node": "q", "name": "b"}) == {"return": {}}
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "bitmaps": ["b"]}) == {"return": {}}
    assert c.cmd("block-dirty-bitmap-merge", {"node": "q", "target": "b", "bitmaps": []}) == {"error": {
        "class": "GenericError", "desc": "Bitmap 'b' is currently in use by another operation and cannot be used"}}


def cross_node_images(d: Path) -> None:
    images(d)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "b.qcow2"), str(4 * MiB)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "s.raw"), str(4 * MiB)], check=True)


def cross_node_script(d: Path, nbd: Path) -> list[Any]:
    """Bitmaps of two other nodes of the same size (a qcow2 and a raw file,
    granularities 4 KiB and 512 B) merged into a bitmap of `q` (64 KiB):
    by command, mixed with one of q's own, and in a transaction."""
    def sha(bitmap: str, node: str = "q") -> Any:
        return ("cmd", "x-debug-block-dirty-bitmap-sha256", {"node": node, "name": bitmap})

    return [
        cmd("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(d / "a.qcow2")}),
        cmd("blockdev-add", driver="qcow2", node_name="o", file={"driver": "file", "filename": str(d / "b.qcow2")}),
        cmd("blockdev-add", driver="file", node_name="s", filename=str(d / "s.raw")),
        ("cmd", "block-dirty-bitmap-add", {"node": "o", "name": "ob", "granularity": 4096}),
        ("cmd", "block-dirty-bitmap-add", {"node": "s", "name": "sb", "granularity": 512}),
        ("cmd", "block-dirty-bitmap-add", {"node": "q", "name": "own"}),
        ("cmd", "block-dirty-bitmap-add", {"node": "q", "name": "dst", "disabled": True}),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "eo", "node-name": "o", "name": "o", "writable": True}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "es", "node-name": "s", "name": "s", "writable": True}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "eq", "node-name": "q", "name": "a", "writable": True}),
        ("call", lambda: qemu_io(nbd, "write 0 1", "write 100000 70000", "write -z 1M 64k", export="o")),
        ("call", lambda: qemu_io(nbd, "write 2M 512", "write 4193792 512", export="s")),
        ("call", lambda: qemu_io(nbd, "write 3M 4096")),
        sha("ob", "o"), sha("sb", "s"),
        cmd("block-dirty-bitmap-merge", node="q", target="dst", bitmaps=[{"node": "o", "name": "ob"}]),
        cmd("query-named-block-nodes", flat=True), sha("dst"),
        cmd("block-dirty-bitmap-merge", node="q", target="dst", bitmaps=["own", {"node": "s", "name": "sb"}]),
        cmd("query-named-block-nodes", flat=True), sha("dst"),
        ("cmd", "block-dirty-bitmap-clear", {"node": "q", "name": "dst"}),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "t", "granularity": 4096}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": "q", "target": "t", "bitmaps": [{"node": "s", "name": "sb"}, {"node": "o", "name": "ob"}]}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "q", "target": "dst", "bitmaps": ["t"]}}]),
        cmd("query-named-block-nodes", flat=True), sha("t"), sha("dst"),
        cmd("block-export-del", id="eo"), cmd("block-export-del", id="es"), cmd("block-export-del", id="eq"),
        cmd("nbd-server-stop"),
    ]


async def test_cross_node_merge_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    ours, cmds = await replies_as_qemu(daemon, tmp_path, cross_node_images, cross_node_script)
    # the merges did something
    shas = [r["return"]["sha256"] for s, r in zip(cmds, ours, strict=True)
            if s[1] == "x-debug-block-dirty-bitmap-sha256"]
    assert len(set(shas)) >= 4, shas
