"""Differential tests of the block jobs: the same QMP flow against
qemu-storage-daemon 7.2 and exportd, on fresh copies of the same images;
replies, job events (with their progress figures where they are
deterministic) and the resulting images (content and backing file) must
be the same."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.jobflow import Step, cmd, job_events, play, wait
from tests.support.qsd import QSD, running_qsd

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

M = 1 << 20


def _qcow2(path: Path, size: str, backing: Path | None = None, *writes: str) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), size], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True, capture_output=True)


def chain(d: Path) -> None:
    """base (a: 0-2M) <- mid (b: 1M-2M) <- top (c: 3M-3.5M), plus empty dst, small."""
    for p in d.glob("*.qcow2"):
        p.unlink()
    _qcow2(d / "base.qcow2", "4M", None, "write -P 0x61 0 2M")
    _qcow2(d / "mid.qcow2", "4M", d / "base.qcow2", "write -P 0x62 1M 1M", "write -z 512k 64k")
    _qcow2(d / "top.qcow2", "4M", d / "mid.qcow2", "write -P 0x63 3M 512k")
    _qcow2(d / "dst.qcow2", "4M")
    _qcow2(d / "small.qcow2", "1M")


def add_top(d: Path) -> Step:
    return cmd("blockdev-add", driver="qcow2", node_name="top",
               file={"driver": "file", "filename": str(d / "top.qcow2")})


def image_facts(d: Path) -> dict[str, Any]:
    """Per image: its guest-visible content (sha256 of qemu-img convert) and backing file."""
    facts = {}
    for img in sorted(d.glob("*.qcow2")):
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                         capture_output=True, text=True, check=True).stdout)
        raw = d / "facts.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(raw)], check=True)
        facts[img.name] = (hashlib.sha256(raw.read_bytes()).hexdigest(), info.get("backing-filename"))
        raw.unlink()
        r = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, (img, r.stdout)
    return facts


async def both(tmp_path: Path, make: Callable[[Path], None], steps: Callable[[Path], list[Step]],
               *, numbers: bool = True, events: bool = True) -> None:
    """Play `steps` against both daemons on fresh images made by `make`;
    compare replies, job events (unless `events` is False: QEMU pauses and
    resumes jobs for each drain, which exportd has no need of) and images."""
    d = tmp_path / "img"
    d.mkdir()
    make(d)
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs, their_events = await play(str(tmp_path / "qsd.sock"), steps(d))
    their_facts = image_facts(d)
    make(d)
    sock = tmp_path / "exportd.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "server"))
    log = open(tmp_path / "exportd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "exportd", "--socket", str(sock)], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if sock.exists():
                break
            assert proc.poll() is None, (tmp_path / "exportd.log").read_text()
            await asyncio.sleep(0.05)
        ours, our_events = await play(str(sock), steps(d))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    commands = [s for s in steps(d) if s[0] == "cmd"]
    for step, a, b in zip(commands, ours, theirs, strict=True):
        assert a == b, step
    if not events:
        our_events = their_events = []
    ours_seen, theirs_seen = (job_events(e, keep_numbers=numbers) for e in (our_events, their_events))
    assert ours_seen == theirs_seen, "\n".join(f"{a!s:90} {b!s}" for a, b in
                                             __import__("itertools").zip_longest(ours_seen, theirs_seen))
    assert image_facts(d) == their_facts


def mirror_flow(d: Path) -> list[Step]:
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(d / "dst.qcow2")}),
        cmd("blockdev-add", driver="qcow2", node_name="small",
            file={"driver": "file", "filename": str(d / "small.qcow2")}),
        cmd("blockdev-mirror", device="top", target="dst", sync="full"),
        cmd("blockdev-mirror", job_id="m", device="nope", target="dst", sync="full"),
        cmd("blockdev-mirror", job_id="m", device="top", target="nope", sync="full"),
        cmd("blockdev-mirror", job_id="m", device="top", target="top", sync="full"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="bitmap"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", granularity=1000),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", granularity=256),
        cmd("blockdev-mirror", job_id="1m", device="top", target="dst", sync="full"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", speed=-1),
        cmd("job-complete", id="nope"),
        cmd("block-job-complete", device="nope"),
        cmd("blockdev-mirror", job_id="s", device="top", target="small", sync="full", auto_dismiss=False),
        wait("JOB_STATUS_CHANGE", id="s", status="concluded"),
        cmd("query-block-jobs"),
        cmd("block-job-dismiss", id="s"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", speed=1),
        cmd("blockdev-mirror", job_id="m2", device="top", target="dst", sync="full"),
        cmd("block-job-complete", device="m"),
        cmd("job-complete", id="m"),
        cmd("block-job-pause", device="m"),
        cmd("block-job-pause", device="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="paused"),
        cmd("block-job-cancel", device="m"),
        cmd("block-job-resume", device="m"),
        cmd("block-job-resume", device="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="running"),
        cmd("block-job-set-speed", device="m", speed=-5),
        cmd("block-job-set-speed", device="m", speed=0),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("block-job-set-speed", device="m", speed=1000),
        cmd("job-pause", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="standby"),
        cmd("job-resume", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="ready"),
        cmd("blockdev-del", node_name="top"),
        cmd("blockdev-del", node_name="dst"),
        cmd("block-job-complete", device="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("query-block-jobs"),
        cmd("query-jobs"),
        cmd("job-dismiss", id="m"),
        cmd("blockdev-del", node_name="top"),
        cmd("blockdev-del", node_name="dst"),
    ]


async def test_mirror_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, mirror_flow)


def busy_flow(d: Path) -> list[Step]:
    """What a running job refuses on its nodes."""
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(d / "dst.qcow2")}),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="none"),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("blockdev-snapshot-sync", node_name="top", snapshot_file=str(d / "nope.qcow2"), snapshot_node_name="x"),
        cmd("block_resize", node_name="top", size=8 * M),
        cmd("block_resize", node_name="dst", size=8 * M),
        cmd("block_resize", node_name="mid", size=8 * M),
        cmd("blockdev-del", node_name="top"),
        cmd("blockdev-del", node_name="dst"),
        cmd("block-stream", job_id="s", device="top"),
        cmd("block-commit", job_id="c", device="top"),
        cmd("blockdev-mirror", job_id="m2", device="dst", target="top", sync="full"),
        cmd("block-job-cancel", device="m", force=True),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("blockdev-del", node_name="dst"),
        cmd("blockdev-del", node_name="top"),
    ]


async def test_busy_nodes_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, busy_flow, events=False)


def commit_flow(d: Path) -> list[Step]:
    return [
        add_top(d),
        cmd("block-commit", job_id="c", device="nope"),
        cmd("block-commit", job_id="c", device="top", top_node="nope"),
        cmd("block-commit", job_id="c", device="top", base_node="nope"),
        cmd("block-commit", job_id="c", device="top", top_node="top", top="x"),
        cmd("block-commit", job_id="c", device="top", base_node="top"),
        cmd("block-commit", job_id="c", device="top", base="nope.qcow2"),
        cmd("block-commit", job_id="c", device="top", top="nope.qcow2"),
        cmd("block-commit", device="top"),
        cmd("block-commit", job_id="c", device="top", backing_file="x"),
        cmd("block-commit", job_id="c", device="top", top_node="#block999"),
    ]


def commit_intermediate_flow(d: Path) -> list[Step]:
    return [
        add_top(d),
        cmd("block-commit", job_id="c", device="top", top=str(d / "mid.qcow2"), auto_dismiss=False),
        wait("JOB_STATUS_CHANGE", id="c", status="concluded"),
        cmd("query-block-jobs"),
        cmd("job-dismiss", id="c"),
        cmd("blockdev-del", node_name="top"),
    ]


def commit_active_flow(d: Path) -> list[Step]:
    return [
        add_top(d),
        cmd("block-commit", job_id="c", device="top", base=str(d / "mid.qcow2")),
        wait("BLOCK_JOB_READY", device="c"),
        cmd("query-block-jobs"),
        cmd("job-complete", id="c"),
        wait("JOB_STATUS_CHANGE", id="c", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


def stream_flow(d: Path) -> list[Step]:
    return [
        add_top(d),
        cmd("block-stream", job_id="s", device="nope"),
        cmd("block-stream", job_id="s", device="top", base_node="nope"),
        cmd("block-stream", job_id="s", device="top", base_node="top"),
        cmd("block-stream", job_id="s", device="top", base="nope.qcow2"),
        cmd("block-stream", job_id="s", device="top", base="x", base_node="y"),
        cmd("block-stream", job_id="s", device="top", bottom="x", base_node="y"),
        cmd("block-stream", job_id="s", device="top", base="x", bottom="y"),
        cmd("block-stream", job_id="s", device="top", backing_file="x"),
        cmd("block-stream", job_id="s", device="top", bottom="nope"),
        cmd("block-stream", job_id="s", device="top", base=str(d / "base.qcow2"), auto_finalize=False),
        wait("BLOCK_JOB_PENDING", id="s"),
        cmd("query-block-jobs"),
        cmd("block-job-finalize", id="s"),
        wait("JOB_STATUS_CHANGE", id="s", status="null"),
        cmd("block-stream", job_id="s2", device="top"),
        wait("JOB_STATUS_CHANGE", id="s2", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


@pytest.mark.parametrize("flow", [commit_flow, commit_intermediate_flow, commit_active_flow, stream_flow])
async def test_commit_and_stream_same_as_qemu(tmp_path: Path, flow: Callable[[Path], list[Step]]) -> None:
    await both(tmp_path, chain, flow)
