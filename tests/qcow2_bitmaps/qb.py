"""What the qcow2 bitmap tests share: running the QEMU tools, images with
bitmaps made by qemu-img, QMP steps for the bitmap commands, and playing a
script on qemu-storage-daemon 7.2 or exportd with the replies normalized for
comparison."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bitmaps.test_vs_qemu import qemu_io
from tests.support.jobflow import Step, cmd, play
from tests.support.qsd import QSD, running_qsd

__all__ = ["qemu_io"]

MiB = 1 << 20
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
QUERY = cmd("query-named-block-nodes", flat=True)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, (args, r.stdout + r.stderr)
    return r


def new_image(work: Path, size: int, *bitmaps: str) -> Path:
    """work/a.qcow2 (work made first) with bitmaps added by qemu-img (each a
    name, or a name after `qemu-img bitmap --add` options)."""
    work.mkdir()
    img = work / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
    for b in bitmaps:
        run("qemu-img", "bitmap", "--add", *b.split()[:-1], str(img), b.split()[-1])
    return img


def bitmaps_of(reply: dict[str, Any]) -> Any:
    """query-named-block-nodes: each node's dirty-bitmaps, and as "NODE:image"
    what its image's directory lists (format-specific `bitmaps`)."""
    if "return" not in reply:
        return reply
    out = {}
    for n in reply["return"]:
        if not n["node-name"].startswith("#"):
            out[n["node-name"]] = n.get("dirty-bitmaps")
            out[n["node-name"] + ":image"] = n["image"].get("format-specific", {}).get("data", {}).get("bitmaps")
    return out


def bm(verb: str, name: str, node: str = "q", **extra: Any) -> Step:
    return ("cmd", f"block-dirty-bitmap-{verb}", {"node": node, "name": name, **extra})


def sha(name: str, node: str = "q") -> Step:
    return ("cmd", "x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})


def image_bitmaps(img: Path) -> Any:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(img)).stdout)
    return info["format-specific"]["data"].get("bitmaps")


async def replies_on(who: str, sock: Path, steps: list[Step], daemon: Any) -> list[Any]:
    """The replies of the script's commands on "qsd" (its QMP socket at
    `sock`) or "exportd" (a new daemon from the `daemon` fixture, which must
    then quit cleanly), query-named-block-nodes replies reduced to bitmaps_of."""
    if who == "qsd":
        async with running_qsd(str(sock)):
            got, _ = await play(str(sock), steps)
    else:
        d = daemon()
        got, _ = await play(d.socket, steps)
        assert d.terminate() == 0
    cmds = [s for s in steps if s[0] == "cmd"]
    assert len(cmds) == len(got)
    return [bitmaps_of(r) if s[1] == "query-named-block-nodes" else r for s, r in zip(cmds, got, strict=True)]
