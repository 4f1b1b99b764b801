"""Corrupt qcow2 metadata found while serving: BLOCK_IMAGE_CORRUPTED once
(QEMU's members; its text for an unaligned L2 table), the read fails with
EIO, the image gets the corrupt bit (qemu-img info: corrupt: true), and a
read-write open is then refused; compared with qemu-storage-daemon 7.2.
(QEMU then also makes the node unusable: "Block device q is ejected";
exportd keeps answering queries about it.)"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobflow import cmd, play
from tests.support.qsd import QSD, running_qsd

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")


def corrupt_image(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(path)], check=True, capture_output=True)
    with open(path, "r+b") as f:
        l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        f.write(struct.pack(">Q", entry + 512))  # the L2 table's offset no longer aligned


def read(sock: Path) -> int:
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", f"nbd+unix:///a?socket={sock}"],
                       capture_output=True, text=True)
    return int("read failed" in r.stdout + r.stderr)


def script(d: Path, out: dict[str, Any]) -> list[Any]:
    nbd = d / "nbd.sock"
    return [
        cmd("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(d / "c.qcow2")}),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a"}),
        ("call", lambda: out.__setitem__("failed", read(nbd) + read(nbd))),
        ("sleep", 0.3),
    ]


async def test_corruption_reported_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    results = []
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        work.mkdir()
        corrupt_image(work / "c.qcow2")
        out: dict[str, Any] = {}
        if who == "qsd":
            async with running_qsd(str(work / "qmp.sock")):
                replies, events = await play(str(work / "qmp.sock"), script(work, out))
        else:
            d = daemon()
            replies, events = await play(d.socket, script(work, out))
            d.terminate()
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(work / "c.qcow2")],
                                         capture_output=True, text=True, check=True).stdout)
        results.append((replies, [e for e in events if e[0] == "BLOCK_IMAGE_CORRUPTED"], out,
                        info["format-specific"]["data"]["corrupt"]))
    assert results[0] == results[1]
    replies, events, out, corrupt = results[1]
    assert events == [("BLOCK_IMAGE_CORRUPTED", {"device": "", "node-name": "q", "fatal": True,
                                                 "msg": "L2 table offset 0x40200 unaligned (L1 index: 0)"})]
    assert out == {"failed": 2} and corrupt is True
