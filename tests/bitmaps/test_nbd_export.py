"""An NBD export offers dirty bitmaps as qemu:dirty-bitmap:NAME contexts,
as qemu-storage-daemon 7.2 does: the same replies (lookups, busy bitmaps,
the read-only rule), the same contexts listed, the same dirty extents
(nbdinfo --map), and the bitmaps free again once the export is gone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bitmaps.test_vs_qemu import images, qemu_io
from tests.support.jobflow import cmd
from tests.support.programs import have
from tests.support.qsd import QSD, play_on_both

pytestmark = [pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed"),
              pytest.mark.skipif(not have("nbdinfo"), reason="nbdinfo missing")]


def nbdinfo(sock: Path, export: str, *args: str) -> Any:
    r = subprocess.run(["nbdinfo", "--json", *args, f"nbd+unix:///{export}?socket={sock}"],
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else ("failed", r.stderr.strip().splitlines()[-1:])


def contexts(sock: Path, export: str) -> Any:
    info = nbdinfo(sock, export)
    return sorted(info["exports"][0]["contexts"]) if isinstance(info, dict) else info


def script(d: Path, out: dict[str, Any]) -> list[Any]:
    nbd = d / "nbd.sock"

    def bm(verb: str, bitmap: str, node: str = "q", **extra: Any) -> Any:
        return ("cmd", f"block-dirty-bitmap-{verb}", {"node": node, "name": bitmap, **extra})

    def export(export_id: str, **extra: Any) -> Any:
        return ("cmd", "block-export-add", {"type": "nbd", "id": export_id, "node-name": "q", **extra})

    def record(key: str, fn: Any) -> Any:
        return ("call", lambda: out.__setitem__(key, fn()))

    return [
        cmd("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(d / "a.qcow2")}),
        cmd("blockdev-add", driver="qcow2", node_name="top", backing="q",
            file={"driver": "file", "filename": str(d / "top.qcow2")}),
        bm("add", "b"), bm("add", "fine", granularity=4096), bm("add", "live"), bm("add", "deep", granularity=1 << 20),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        export("w", name="a", writable=True),
        ("call", lambda: qemu_io(nbd, "write 0 1", "write 100000 70000", "write -z 1M 64k", "write 4194000 304",
                                 "write 2M 1M")),
        bm("disable", "b"), bm("disable", "fine"), bm("disable", "deep"),
        export("r", name="r", bitmaps=["b", {"node": "q", "name": "fine"}]),
        export("r2", name="r2", bitmaps=["live"]),
        export("r3", name="r3", bitmaps=["nope"]),
        export("r4", name="r4", bitmaps=[{"node": "nope", "name": "b"}]),
        export("r5", name="r5", bitmaps=[{"node": "q", "name": "nope"}]),
        ("cmd", "block-export-add", {"type": "nbd", "id": "t", "node-name": "top", "name": "t", "bitmaps": ["b"]}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "t", "node-name": "top", "name": "t", "bitmaps": ["deep"]}),
        record("contexts", lambda: contexts(nbd, "r")),
        record("map-b", lambda: nbdinfo(nbd, "r", "--map=qemu:dirty-bitmap:b")),
        record("map-fine", lambda: nbdinfo(nbd, "r", "--map=qemu:dirty-bitmap:fine")),
        record("map-top", lambda: nbdinfo(nbd, "t", "--map=qemu:dirty-bitmap:deep")),
        bm("clear", "b"), bm("remove", "fine"), bm("enable", "b"),
        # merging into a busy bitmap: the sources are checked first, then the target
        # (an empty list: tests/bitmaps/test_vs_qemu.py, qemu-storage-daemon 7.2 crashes)
        ("cmd", "block-dirty-bitmap-merge", {"node": "q", "target": "b", "bitmaps": ["nope"]}),
        ("cmd", "block-dirty-bitmap-merge", {"node": "q", "target": "b", "bitmaps": ["deep"]}),
        cmd("query-named-block-nodes", flat=True),
        cmd("block-export-del", id="r"), cmd("block-export-del", id="t"),
        ("sleep", 0.5),
        bm("clear", "b"), bm("remove", "fine"),
        cmd("block-export-del", id="w"),
        cmd("nbd-server-stop"),
    ]


def busy_of(reply: dict[str, Any]) -> Any:
    return {n["node-name"]: [(b["name"], b["busy"], b["count"]) for b in n.get("dirty-bitmaps", [])]
            for n in reply["return"] if not n["node-name"].startswith("#")}


def prepare(work: Path) -> None:
    images(work)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(work / "a.qcow2"), "-F", "qcow2",
                    str(work / "top.qcow2")], check=True)


async def test_bitmaps_over_nbd_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    both = await play_on_both(tmp_path, daemon, prepare, script)

    def summary(who: str) -> tuple[list[Any], dict[str, Any]]:
        replies, _events, out = both[who]
        return [busy_of(r) if isinstance(r.get("return"), list) else r for r in replies], out

    (theirs, their_out), (ours, our_out) = summary("qsd"), summary("exportd")
    steps = [s for s in script(tmp_path, {}) if s[0] == "cmd"]
    for step, a, b in zip(steps, ours, theirs, strict=True):
        assert a == b, (step, a, b)
    assert our_out == their_out
    assert [(e["length"], e["description"]) for e in our_out["map-top"]] == [(4 << 20, "dirty")]
    assert [e["description"] for e in our_out["map-b"]] == ["dirty", "clean", "dirty", "clean", "dirty", "clean",
                                                           "dirty"], our_out["map-b"]
