"""block-set-write-threshold and BLOCK_WRITE_THRESHOLD as in
qemu-storage-daemon 7.2: the same replies, write_threshold in
query-named-block-nodes, one event per threshold on the format node with
the same figures, and one on its protocol node (where libvirt sets it);
the threshold is off after its event. Writes come over NBD from qemu-io."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bitmaps.test_vs_qemu import qemu_io
from tests.support.jobflow import cmd
from tests.support.qsd import QSD, play_on_both

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")


def script(d: Path) -> list[Any]:
    nbd = d / "nbd.sock"
    query = cmd("query-named-block-nodes")
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q",
            file={"driver": "file", "filename": str(d / "t.qcow2"), "node-name": "f"}),
        cmd("block-set-write-threshold", node_name="nope", write_threshold=1),
        cmd("block-set-write-threshold", node_name="f", write_threshold=300000),
        cmd("block-set-write-threshold", node_name="q", write_threshold=1 << 20),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        query,
        ("call", lambda: qemu_io(nbd, "write 1000k 4k")),  # below both: nothing
        ("call", lambda: qemu_io(nbd, "write 1000k 48k", "write 1M 4k", "write -z 3M 64k")),
        query,
        cmd("block-set-write-threshold", node_name="q", write_threshold=2 << 20),
        ("call", lambda: qemu_io(nbd, "write -z 3M 64k")),
        cmd("block-set-write-threshold", node_name="q", write_threshold=0),
        ("call", lambda: qemu_io(nbd, "write 3M 64k")),
        query,
        cmd("block-export-del", id="e"),
        cmd("nbd-server-stop"),
    ]


def thresholds(reply: dict[str, Any]) -> Any:
    if not isinstance(reply.get("return"), list):
        return reply
    return sorted((n["node-name"], n["write_threshold"]) for n in reply["return"])


async def test_write_threshold_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    def prepare(work: Path) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "t.qcow2"), "4M"], check=True)

    both = await play_on_both(tmp_path, daemon, prepare, lambda d, out: script(d))

    def summary(who: str) -> tuple[list[Any], list[Any]]:
        replies, events, _out = both[who]
        return [thresholds(r) for r in replies], [d for n, d in events if n == "BLOCK_WRITE_THRESHOLD"]

    (theirs, their_events), (ours, our_events) = summary("qsd"), summary("exportd")
    assert ours == theirs
    assert ours[1] == {"error": ["GenericError", "Device 'nope' not found"]}
    # the format node's events are the same; the file node's figure depends
    # on where each driver puts its clusters, so only its presence counts
    assert [d for d in our_events if d["node-name"] == "q"] == [d for d in their_events if d["node-name"] == "q"] == [
        {"node-name": "q", "write-threshold": 1 << 20, "amount-exceeded": 24576},
        {"node-name": "q", "write-threshold": 2 << 20, "amount-exceeded": (3 << 20) + 65536 - (2 << 20)}]
    assert [d["write-threshold"] for d in our_events if d["node-name"] == "f"] == [300000]
