"""Differential test: the same blockdev-create / job script against exportd and
qemu-storage-daemon (Debian's, test oracle only): replies, each job's
JOB_STATUS_CHANGE sequence and query-jobs must be the same.

Known differences, not in the script: a backing file that does not exist
without backing-fmt (exportd probes the format and fails, QEMU records no
format), permission-conflict texts (exportd's block layer words them its
way), the hint exportd adds to a lock failure, and driver=raw (an exportd
alias of file; QEMU has no raw creation).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.support.qsd import QSD, running_qsd

MiB = 1 << 20


def script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    ovl, base = str(d / "ovl.qcow2"), str(d / "base.qcow2")
    q = {"driver": "qcow2", "file": "f0", "size": MiB}
    return [
        ("query-jobs", {}),
        ("blockdev-create", {"job-id": "j0", "options": {"driver": "file", "filename": ovl, "size": 0}}),
        ("query-jobs", {}),
        ("blockdev-create", {"job-id": "j0", "options": {"driver": "file", "filename": ovl, "size": 0}}),
        ("job-finalize", {"id": "j0"}),
        ("job-cancel", {"id": "j0"}),
        ("job-dismiss", {"id": "j0"}),
        ("job-dismiss", {"id": "j0"}),
        ("job-cancel", {"id": "j0"}),
        ("job-finalize", {"id": "nope"}),
        ("blockdev-create", {"job-id": "#x", "options": {"driver": "file", "filename": ovl, "size": 0}}),
        ("blockdev-create", {"job-id": "", "options": {"driver": "file", "filename": ovl, "size": 0}}),
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": ovl}),
        ("blockdev-add", {"driver": "file", "node-name": "ro", "filename": base, "read-only": True}),
        ("blockdev-create", {"job-id": "j1", "options": {**q, "size": 4 * MiB, "backing-file": base,
                                                         "backing-fmt": "qcow2", "cluster-size": 4096}}),
        ("query-jobs", {}),
        ("job-dismiss", {"id": "j1"}),
        ("blockdev-create", {"job-id": "e1", "options": {**q, "file": "nonode"}}),
        ("blockdev-create", {"job-id": "e2", "options": {**q, "file": "ro"}}),
        ("blockdev-create", {"job-id": "e3", "options": {**q, "size": 1000}}),
        ("blockdev-create", {"job-id": "e4", "options": {**q, "cluster-size": 3000}}),
        ("blockdev-create", {"job-id": "e5", "options": {**q, "refcount-bits": 3}}),
        ("blockdev-create", {"job-id": "e6", "options": {**q, "backing-fmt": "qcow2"}}),
        ("blockdev-create", {"job-id": "e7", "options": {**q, "version": "v2", "lazy-refcounts": True}}),
        ("blockdev-create", {"job-id": "e8", "options": {**q, "version": "v2", "compression-type": "zstd"}}),
        ("blockdev-create", {"job-id": "e9", "options": {**q, "backing-file": base, "backing-fmt": "qcow2",
                                                         "preallocation": "metadata"}}),
        ("blockdev-create", {"job-id": "e10", "options": {**q, "file": {"driver": "file",
                                                                         "filename": str(d / "none")}}}),
        ("blockdev-create", {"job-id": "e11", "options": {"driver": "file", "filename": str(d / "no/x"),
                                                          "size": 0}}),
        ("blockdev-create", {"job-id": "e12", "options": {"driver": "file", "filename": str(d / "m"),
                                                          "size": MiB, "preallocation": "metadata"}}),
        ("query-jobs", {}),
        ("blockdev-create", {"job-id": "v2", "options": {**q, "version": "v2", "size": 2 * MiB}}),
        ("query-jobs", {}),
    ]


async def play(socket_path: str, steps: list[tuple[str, dict[str, Any]]]) -> tuple[list, dict]:
    """Each step's reply, and each job's statuses (waiting for every started job
    to conclude or vanish before the next step)."""
    client = QMPClient("diff")
    await client.connect(socket_path)
    listener = EventListener(("JOB_STATUS_CHANGE",))
    client.register_listener(listener)
    replies: list[Any] = []
    statuses: dict[str, list[str]] = {}

    async def until(job_id: str, status: str) -> None:
        while status not in statuses.get(job_id, []):
            ev = await asyncio.wait_for(listener.get(), 15)
            statuses.setdefault(ev["data"]["id"], []).append(ev["data"]["status"])

    try:
        for name, args in steps:
            try:
                replies.append({"return": await client.execute(name, args or None)})
            except ExecuteError as e:
                replies.append({"error": e.error.error.desc})
                continue
            if name == "blockdev-create":
                await until(args["job-id"], "concluded")
            elif name == "job-dismiss":
                await until(args["id"], "null")
    finally:
        await client.disconnect()
    return replies, statuses


async def run_qsd(socket_path: str, steps: list) -> tuple[list, dict]:
    async with running_qsd(socket_path):
        return await play(socket_path, steps)


def image_facts(img: Path) -> dict[str, Any]:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True,
                       text=True, check=True)
    i = json.loads(r.stdout)
    data = i["format-specific"]["data"]
    return {"format": i["format"], "virtual-size": i["virtual-size"],
            "cluster-size": i["cluster-size"], "compat": data["compat"],
            "refcount-bits": data["refcount-bits"], "backing": i.get("backing-filename")}


def fresh(d: Path) -> None:
    for p in d.iterdir():
        if p.suffix != ".sock":
            p.unlink()
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(MiB)])
    assert r.returncode == 0


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_jobs_same_as_qemu(daemon, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    steps = script(work)
    fresh(work)
    theirs = await run_qsd(str(tmp_path / "qsd.sock"), steps)
    qsd_image = image_facts(work / "ovl.qcow2")
    fresh(work)
    d = daemon()
    ours = await play(d.socket, steps)
    for i, (step, a, b) in enumerate(zip(steps, ours[0], theirs[0], strict=True)):
        assert a == b, (i, step)
    assert ours[1] == theirs[1]
    # the last creation (v2, 2 MiB) leaves the same image, metadata layout aside
    assert image_facts(work / "ovl.qcow2") == qsd_image
    assert subprocess.run(["qemu-img", "check", "-q", str(work / "ovl.qcow2")]).returncode == 0
