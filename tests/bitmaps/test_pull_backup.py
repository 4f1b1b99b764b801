"""Pull-mode incremental backup as libvirt runs it on a live disk (QEMU's
"fleecing"): in one transaction a new checkpoint bitmap starts, the old one
stops, and a backup job with sync=none starts copying old data, before any
write overwrites it, into a scratch overlay whose backing node is the disk.
The scratch node is exported over NBD with the old bitmap; the backup tool
reads only the dirty extents while the disk keeps being written, and gets
the disk's contents as of the checkpoint. Run against qemu-storage-daemon
7.2 and exportd: the same replies, the same dirty extents, the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bitmaps.test_vs_qemu import qemu_io
from tests.support.jobflow import cmd
from tests.support.programs import have
from tests.support.qsd import QSD, play_on_both

pytestmark = [pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed"),
              pytest.mark.skipif(not have("nbdinfo") or not have("nbdcopy"), reason="libnbd-bin missing")]

MiB = 1 << 20


def images(d: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), str(8 * MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", str(d / "disk.qcow2")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(d / "disk.qcow2"), "-F", "qcow2",
                    str(d / "scratch.qcow2")], check=True)


def copy_out(sock: Path, export: str, out: Path) -> str:
    subprocess.run(["nbdcopy", f"nbd+unix:///{export}?socket={sock}", str(out)], check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


# A backup tool's incremental pull, with python3-libnbd: the dirty extents of
# the checkpoint bitmap, and only those, read over NBD onto the last backup.
PULL_DIRTY = """
import sys, nbd
uri, out = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:chk0")
h.connect_uri(uri)
size, dirty, offset = h.get_size(), [], 0
def extents(ctx, off, entries, err):
    global offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((offset, entries[i]))
        offset += entries[i]
while offset < size:
    h.block_status(size - offset, offset, extents)
with open(out, "r+b") as f:
    for off, n in dirty:
        f.seek(off)
        f.write(h.pread(n, off))
print(sum(n for _, n in dirty))
"""


def pull_dirty_while_writing(sock: Path, base: Path, out: Path) -> int:
    """Apply the dirty extents of export `backup` over a copy of `base`
    while the guest keeps writing to `live`; the bytes read."""
    shutil.copyfile(base, out)
    guest = subprocess.Popen(["qemu-io", "-f", "raw", *[a for i in range(32) for a in
                              ("-c", f"write -P {0x60 + i} {(i % 8) * MiB + 4096 * i} 128k")],
                              f"nbd+unix:///live?socket={sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        r = subprocess.run(["/usr/bin/python3", "-c", PULL_DIRTY, f"nbd+unix:///backup?socket={sock}", str(out)],
                           capture_output=True, text=True)
    finally:
        _, err = guest.communicate(timeout=60)
    assert guest.returncode == 0, err
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dirty_map(sock: Path, export: str) -> Any:
    r = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:chk0", f"nbd+unix:///{export}?socket={sock}"],
                       capture_output=True, text=True)
    if r.returncode:
        return ("failed", r.stderr)
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(r.stdout)]


def script(d: Path, out: dict[str, Any]) -> list[Any]:
    nbd = d / "nbd.sock"

    def record(key: str, fn: Any) -> Any:
        return ("call", lambda: out.__setitem__(key, fn()))

    return [
        cmd("blockdev-add", driver="qcow2", node_name="disk",
            file={"driver": "file", "filename": str(d / "disk.qcow2")}),
        ("cmd", "block-dirty-bitmap-add", {"node": "disk", "name": "chk0"}),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "live", "node-name": "disk", "name": "live",
                                     "writable": True}),
        record("full", lambda: copy_out(nbd, "live", d / "full.raw")),  # the backup at chk0
        ("call", lambda: qemu_io(nbd, "write -P 0x22 1M 64k", "write -P 0x33 3M 200k", "write -z 5M 64k",
                                 export="live")),
        record("checkpoint", lambda: copy_out(nbd, "live", d / "checkpoint.raw")),
        cmd("blockdev-add", driver="qcow2", node_name="scratch", backing="disk",
            file={"driver": "file", "filename": str(d / "scratch.qcow2")}),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "chk1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "chk0"}},
            {"type": "blockdev-backup", "data": {"job-id": "fleece", "device": "disk", "target": "scratch",
                                                 "sync": "none"}}]),
        ("cmd", "block-export-add", {"type": "nbd", "id": "backup", "node-name": "scratch", "name": "backup",
                                     "bitmaps": ["chk0"]}),
        # the guest goes on writing, over data the backup has not read yet
        ("call", lambda: qemu_io(nbd, "write -P 0x44 1M 1M", "write -P 0x55 0 4k", "write -z 3M 64k",
                                 export="live")),
        record("map", lambda: dirty_map(nbd, "backup")),
        record("pulled", lambda: pull_dirty_while_writing(nbd, d / "full.raw", d / "incremental.raw")),
        record("restored", lambda: sha(d / "incremental.raw")),
        record("backup", lambda: copy_out(nbd, "backup", d / "backup.raw")),
        record("live-now", lambda: copy_out(nbd, "live", d / "live.raw")),
        cmd("query-named-block-nodes", flat=True),
        cmd("block-export-del", id="backup"),
        ("sleep", 0.3),
        cmd("block-job-cancel", device="fleece"),
        cmd("block-export-del", id="live"),
        cmd("nbd-server-stop"),
    ]


def bitmaps(reply: dict[str, Any]) -> Any:
    """The named bitmaps (QEMU also lists its backup job's own, unnamed)."""
    return {n["node-name"]: [(b["name"], b["recording"], b["busy"], b["count"])
                             for b in n.get("dirty-bitmaps", []) if "name" in b]
            for n in reply["return"] if not n["node-name"].startswith("#")}


async def test_pull_mode_incremental_backup(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    both = await play_on_both(tmp_path, daemon, images, script)

    def summary(who: str) -> tuple[list[Any], dict[str, Any]]:
        replies, _events, out = both[who]
        return [bitmaps(r) if isinstance(r.get("return"), list) else r for r in replies], out

    (theirs, their_out), (ours, our_out) = summary("qsd"), summary("exportd")
    steps = [s for s in script(tmp_path, {}) if s[0] == "cmd"]
    for step, a, b in zip(steps, ours, theirs, strict=True):
        assert a == b, (step, a, b)
    assert our_out == their_out
    # the backup shows the checkpoint, not what the guest wrote since
    assert our_out["backup"] == our_out["checkpoint"] != our_out["live-now"]
    dirty = [(o, n) for o, n, what in our_out["map"] if what == "dirty"]
    assert dirty == [(1 * MiB, 64 << 10), (3 * MiB, 256 << 10), (5 * MiB, 64 << 10)], our_out["map"]
    # the last full backup plus only the dirty extents, read while the guest
    # wrote, is the disk at the checkpoint
    assert our_out["pulled"] == sum(n for _, n in dirty)
    assert our_out["restored"] == our_out["checkpoint"] != our_out["full"]
