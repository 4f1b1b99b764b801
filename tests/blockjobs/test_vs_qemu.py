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
    """Per image: its guest-visible content (sha256 of qemu-img convert),
    backing file, and how many clusters qemu-img check finds leaked
    (corruption fails at once)."""
    facts = {}
    for img in sorted(d.glob("**/*.qcow2")):
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                         capture_output=True, text=True, check=True).stdout)
        raw = d / "facts.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(raw)], check=True)
        r = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True)
        assert r.returncode in (0, 3), (img, r.stdout, r.stderr)  # 3: leaks only
        leaks = json.loads(r.stdout).get("leaks", 0)
        facts[str(img.relative_to(d))] = (hashlib.sha256(raw.read_bytes()).hexdigest(), info.get("backing-filename"),
                                          leaks)
        raw.unlink()
    return facts


async def both(tmp_path: Path, make: Callable[[Path], None], steps: Callable[[Path], list[Step]],
               *, numbers: bool = True, events: bool = True,
               normalize: Callable[[Any], Any] = lambda reply: reply) -> None:
    """Play `steps` against both daemons on fresh images made by `make`;
    compare replies (through `normalize`, for deliberate differences), job events (unless `events` is False: QEMU pauses and
    resumes jobs for each drain, which exportd has no need of) and images (leaked clusters included)."""
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
        assert normalize(a) == normalize(b), step
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


def _qcow2_node(d: Path, name: str, **more: Any) -> Step:
    return cmd("blockdev-add", driver="qcow2", node_name=name,
               file={"driver": "file", "filename": str(d / f"{name}.qcow2")}, **more)


def replaces_flow(d: Path) -> list[Step]:
    """`replaces`: QEMU's checks in its order (unknown node, node in use,
    abrupt change of visible data: only the source or a node below it
    through filters qualifies), then a working one: the mirror of a
    throttle filter replaces the node under the filter, so the filter ends
    up over the target."""
    return [
        _qcow2_node(d, "mid"),
        _qcow2_node(d, "top", backing="mid"),
        _qcow2_node(d, "dst"),
        _qcow2_node(d, "small"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="nope"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="mid"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="small"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="dst"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="bitmap", replaces="nope"),
        cmd("blockdev-mirror", job_id="m", device="top", target="top", sync="full", replaces="small"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="top", buf_size=-1),
        cmd("drive-mirror", job_id="m", device="top", target=str(d / "x.qcow2"), sync="full", replaces="top"),
        cmd("object-add", qom_type="throttle-group", id="tg"),
        cmd("blockdev-add", driver="throttle", node_name="thr", throttle_group="tg", file="top"),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", replaces="top"),
        cmd("blockdev-mirror", job_id="m", device="thr", target="dst", sync="full", replaces="mid"),
        cmd("blockdev-mirror", job_id="m", device="thr", target="dst", sync="full", replaces="small"),
        cmd("blockdev-mirror", job_id="m", device="thr", target="dst", sync="full", replaces="top"),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("job-complete", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("x-debug-query-block-graph"),
        cmd("blockdev-del", node_name="thr"),
        cmd("blockdev-del", node_name="dst"),
        cmd("blockdev-del", node_name="top"),
    ]


def replaces_lost_flow(d: Path) -> list[Step]:
    """The node to replace no longer lies below the source through filters
    at job-complete (a snapshot put a qcow2 overlay between them): QEMU
    checks again at the pivot and fails the job with EPERM."""
    return [
        _qcow2_node(d, "mid"),
        _qcow2_node(d, "top", backing="mid"),
        _qcow2_node(d, "dst"),
        cmd("object-add", qom_type="throttle-group", id="tg"),
        cmd("blockdev-add", driver="throttle", node_name="thr", throttle_group="tg", file="top"),
        cmd("blockdev-mirror", job_id="m", device="thr", target="dst", sync="full", replaces="top",
            auto_dismiss=False),
        wait("BLOCK_JOB_READY", device="m"),
        ("call", lambda: _qcow2(d / "ov.qcow2", "4M")),
        _qcow2_node(d, "ov", backing=None),
        cmd("blockdev-snapshot", node="top", overlay="ov"),
        cmd("job-complete", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="concluded"),
        cmd("query-block-jobs"),
        cmd("job-dismiss", id="m"),
        cmd("x-debug-query-block-graph"),
    ]


async def test_mirror_replaces_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, replaces_flow, normalize=graph_shape)


def _nbd_writes(sock: Path, *offsets: int) -> None:
    """64 KiB writes to the NBD export 'top' (from a process of their own)."""
    args = ["qemu-io", "-f", "raw"]
    for off in offsets:
        args += ["-c", f"write -P 0x65 {off} 64k"]
    r = subprocess.run([*args, f"nbd+unix:///top?socket={sock}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def complete_refused_flow(d: Path) -> list[Step]:
    """QEMU's job_complete checks beyond the verb table: a READY mirror that
    was cancelled (soft) cannot be completed. To keep it READY after the
    cancel, writes through an NBD export leave it work, and its target is a
    throttle node whose group then lets 64 KiB/s through (QEMU 7.2 ignores
    `speed` once READY); lifting the limit lets it finish. A paused READY
    job (standby) refuses a soft cancel but accepts job-complete, and
    pivots on resume."""
    sock = d / "nbd.sock"
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(d / "dst.qcow2")}),
        cmd("object-add", qom_type="throttle-group", id="tg"),
        cmd("blockdev-add", driver="throttle", node_name="slow", throttle_group="tg", file="dst"),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "name": "top", "writable": True}),
        cmd("blockdev-mirror", job_id="m", device="top", target="slow", sync="full"),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("qom-set", path="tg", property="limits", value={"bps-write": 64 << 10}),
        ("call", lambda: _nbd_writes(sock, 0, 1 * M, 2 * M, 3 * M)),
        ("sleep", 0.3),
        cmd("block-job-cancel", device="m"),
        cmd("job-complete", id="m"),
        cmd("block-job-complete", device="m"),
        cmd("query-block-jobs"),
        cmd("qom-set", path="tg", property="limits", value={}),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("blockdev-del", node_name="slow"),
        cmd("blockdev-mirror", job_id="m2", device="top", target="dst", sync="full"),
        wait("BLOCK_JOB_READY", device="m2"),
        cmd("job-pause", id="m2"),
        wait("JOB_STATUS_CHANGE", id="m2", status="standby"),
        cmd("block-job-cancel", device="m2"),
        cmd("job-complete", id="m2"),
        cmd("query-block-jobs"),
        cmd("job-resume", id="m2"),
        wait("JOB_STATUS_CHANGE", id="m2", status="null"),
        cmd("block-export-del", id="e"),
        wait("BLOCK_EXPORT_DELETED"),
        cmd("nbd-server-stop"),
        cmd("blockdev-del", node_name="top"),
    ]


def job_states(reply: Any) -> Any:
    """query-block-jobs without the progress figures (they depend on timing)."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "io-status" in ret[0]:
        return [{k: v for k, v in j.items() if k not in ("len", "offset", "busy")} for j in ret]
    return reply


async def test_complete_refused_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, complete_refused_flow, numbers=False, normalize=job_states)


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


def stream_bottom_flow(d: Path) -> list[Step]:
    """A stream down to `bottom` (mid's data into top, base stays); QEMU
    7.2 refuses a backing file name with `bottom` (it checks `base` only)."""
    return [
        _qcow2_node(d, "mid"),
        _qcow2_node(d, "top", backing="mid"),
        cmd("block-stream", job_id="s", device="top", bottom="mid", backing_file="base.qcow2"),
        cmd("block-stream", job_id="s", device="top", bottom="mid", auto_dismiss=False),
        wait("JOB_STATUS_CHANGE", id="s", status="concluded"),
        cmd("query-block-jobs"),
        cmd("job-dismiss", id="s"),
        cmd("query-named-block-nodes"),
        cmd("blockdev-del", node_name="top"),
    ]


def stream_backing_file_flow(d: Path) -> list[Step]:
    """A stream to a base that writes the backing file name given into top's header."""
    return [
        add_top(d),
        cmd("block-stream", job_id="s", device="top", base=str(d / "base.qcow2"), backing_file="base.qcow2"),
        wait("JOB_STATUS_CHANGE", id="s", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


def commit_backing_file_flow(d: Path) -> list[Step]:
    """An intermediate commit (mid into base) that writes the backing file
    name given into top's header. (QEMU then names top by a json: filename,
    as its header no longer names its backing node's file; exportd keeps
    the plain file name, so query-named-block-nodes is not compared.)"""
    return [
        add_top(d),
        cmd("block-commit", job_id="c", device="top", top=str(d / "mid.qcow2"), base=str(d / "base.qcow2"),
            backing_file="base.qcow2"),
        wait("JOB_STATUS_CHANGE", id="c", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


def mirror_granularity_flow(d: Path) -> list[Step]:
    """A mirror with a granularity and a buffer size of its own: the same
    progress figures and result as QEMU's."""
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(d / "dst.qcow2")}),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="top", granularity=8192,
            buf_size=64 << 10),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("query-block-jobs"),
        cmd("job-complete", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("blockdev-mirror", job_id="m2", device="dst", target="top", sync="full", granularity=1 << 20,
            buf_size=512 << 10),
        wait("BLOCK_JOB_READY", device="m2"),
        cmd("query-block-jobs"),
        cmd("block-job-cancel", device="m2"),
        wait("JOB_STATUS_CHANGE", id="m2", status="null"),
        cmd("blockdev-del", node_name="dst"),
        cmd("blockdev-del", node_name="top"),
    ]


@pytest.mark.parametrize("flow", [stream_bottom_flow, stream_backing_file_flow, commit_backing_file_flow,
                                  mirror_granularity_flow])
async def test_job_options_same_as_qemu(tmp_path: Path, flow: Callable[[Path], list[Step]]) -> None:
    await both(tmp_path, chain, flow, normalize=node_names)


@pytest.mark.parametrize("flow", [commit_flow, commit_intermediate_flow, commit_active_flow, stream_flow])
async def test_commit_and_stream_same_as_qemu(tmp_path: Path, flow: Callable[[Path], list[Step]]) -> None:
    await both(tmp_path, chain, flow)


def conflicts_flow(d: Path) -> list[Step]:
    """Permission conflicts between jobs and exports, in QEMU's words. (Where
    QEMU 7.2 refuses an active commit under a writable non-growable FUSE
    export, exportd runs it: its export takes the resize permission only
    for the time of a truncate; tests/blockjobs/test_no_lost_writes.py.)"""
    (d / "m.raw").touch()
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst", file={"driver": "file", "filename": str(d / "dst.qcow2")}),
        cmd("block-export-add", type="fuse", id="e", node_name="dst", writable=True, mountpoint=str(d / "m.raw")),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full"),
        cmd("block-export-del", id="e"),
        wait("BLOCK_EXPORT_DELETED"),
        cmd("block-export-add", type="fuse", id="e2", node_name="top", writable=True, growable=True,
            mountpoint=str(d / "m.raw")),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", filter_node_name="f"),
        cmd("block-commit", job_id="c", device="top", filter_node_name="f"),
        cmd("block-stream", job_id="s", device="top", filter_node_name="f"),
        cmd("block-export-del", id="e2"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


def without_export_resize(reply: Any) -> Any:
    """QEMU's writable FUSE export holds the resize permission all the time;
    exportd's takes it for a truncate only, so a conflict lists one less."""
    text = json.dumps(reply).replace("'consistent read, write, resize'", "'consistent read, write'")
    return json.loads(text)


async def test_permission_conflicts_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, conflicts_flow, normalize=without_export_resize)


def graph_flow(d: Path) -> list[Step]:
    """The graph while a job runs: its filter node, its edges and their names."""
    return [
        add_top(d),
        cmd("blockdev-add", driver="qcow2", node_name="dst",
            file={"driver": "file", "filename": str(d / "dst.qcow2"), "node-name": "dstf"}),
        cmd("blockdev-mirror", job_id="m", device="top", target="dst", sync="full", filter_node_name="f"),
        wait("BLOCK_JOB_READY"),
        cmd("x-debug-query-block-graph"),
        cmd("block-job-cancel", device="m", force=True),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("block-stream", job_id="s", device="top", filter_node_name="f", speed=1),
        cmd("x-debug-query-block-graph"),
        cmd("block-job-cancel", device="s", force=True),
        wait("JOB_STATUS_CHANGE", id="s", status="null"),
        cmd("x-debug-query-block-graph"),
    ]


def graph_shape(reply: Any) -> Any:
    """Nodes and named edges of an x-debug-query-block-graph reply (ids,
    generated names and permissions aside: see the README)."""
    graph = reply.get("return")
    if not isinstance(graph, dict) or "nodes" not in graph:
        return reply
    names = {n["id"]: (n["type"], "#" if n["name"].startswith("#") else n["name"]) for n in graph["nodes"]}
    return sorted(set(names.values())), sorted((names[e["parent"]], names[e["child"]], e["name"])
                                               for e in graph["edges"])


async def test_graph_during_jobs_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, graph_flow, normalize=graph_shape)


def _tmpfs(path: Path, size: str, *, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def full_disk(d: Path) -> None:
    """The mirror target on a 1 MiB tmpfs that 3 MiB of data cannot fit."""
    chain(d)
    small = d / "small-fs"
    small.mkdir(exist_ok=True)
    if not any(line.split()[1] == str(small) for line in Path("/proc/mounts").read_text().splitlines()):
        _tmpfs(small, "1M")
    else:
        for p in small.iterdir():
            p.unlink()
        _tmpfs(small, "1M", remount=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(small / "t.raw"), "4M"], check=True)


def unmount_small_fs(tmp_path: Path) -> None:
    """Lazily unmount every daemon directory's small-fs (full_disk's tmpfs)."""
    for small in tmp_path.glob("*/small-fs"):
        subprocess.run(["umount", "-l", str(small)], check=False)


def enospc_flow(d: Path) -> list[Step]:
    """A full target: on-target-error=stop pauses the job with io-status
    nospace and BLOCK_JOB_ERROR; once there is room, resume finishes it."""
    return [
        add_top(d),
        cmd("blockdev-add", driver="file", node_name="t", filename=str(d / "small-fs" / "t.raw")),
        cmd("blockdev-mirror", job_id="m", device="top", target="t", sync="full", on_target_error="stop"),
        wait("BLOCK_JOB_ERROR", device="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="paused"),
        cmd("query-block-jobs"),
        ("call", lambda: _tmpfs(d / "small-fs", "16M", remount=True)),
        cmd("block-job-resume", device="m"),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("block-job-complete", device="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("blockdev-del", node_name="t"),
    ]


def io_status_only(reply: Any) -> Any:
    """query-block-jobs while stopped on an error: the fields that do not
    depend on how far the copy got before the disk filled."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "io-status" in ret[0]:
        return [{k: j[k] for k in ("device", "status", "paused", "io-status", "ready")} for j in ret]
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
async def test_enospc_stop_and_resume_same_as_qemu(tmp_path: Path) -> None:
    try:
        await both(tmp_path, full_disk, enospc_flow, numbers=False, normalize=io_status_only)
    finally:
        unmount_small_fs(tmp_path)


def drive_mirror_flow(d: Path) -> list[Step]:
    """drive-mirror creates its target: full (no backing), top (backing =
    the source's backing file) and none, each pivoted; then existing."""
    steps: list[Step] = [add_top(d)]
    for sync in ("full", "top", "none"):
        steps += [
            cmd("drive-mirror", job_id=f"m-{sync}", device="top", target=str(d / f"t-{sync}.qcow2"), sync=sync,
                format="qcow2", node_name=f"t-{sync}"),
            wait("BLOCK_JOB_READY", device=f"m-{sync}"),
            cmd("block-job-cancel", device=f"m-{sync}"),
            wait("JOB_STATUS_CHANGE", id=f"m-{sync}", status="null"),
        ]
    steps += [
        cmd("drive-mirror", job_id="m", device="top", target=str(d / "dst.qcow2"), sync="full", mode="existing"),
        cmd("drive-mirror", job_id="x", device="top", target=str(d / "nope" / "x.qcow2"), sync="full"),
        cmd("drive-mirror", job_id="x", device="top", target=str(d / "x.qcow2"), sync="full", node_name="top"),
        wait("BLOCK_JOB_READY", device="m"),
        cmd("job-complete", id="m"),
        wait("JOB_STATUS_CHANGE", id="m", status="null"),
        cmd("query-named-block-nodes"),
    ]
    return steps


def node_names(reply: Any) -> Any:
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "node-name" in ret[0]:
        return sorted((n["node-name"], n["drv"], Path(n["file"]).name) for n in ret if not n["node-name"].startswith("#"))
    return reply


async def test_drive_mirror_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, chain, drive_mirror_flow, normalize=node_names)


def filled_targets(d: Path) -> None:
    """The chain, plus targets full of data (0x64) for drive-mirror mode=existing."""
    chain(d)
    for discard in ("unmap", "ignore"):
        for unmap in ("false", "true"):
            _qcow2(d / f"t-{discard}-{unmap}.qcow2", "4M", None, "write -P 0x64 0 4M")


def image_map(path: Path) -> list[dict[str, Any]]:
    """`qemu-img map` of an image: where it holds data, zeroes or nothing,
    with whether a host cluster backs it; neighbours alike are merged (host
    offsets are left out: they depend on the order of allocation)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         check=True).stdout
    merged: list[dict[str, Any]] = []
    for m in json.loads(out):
        m = {k: v for k, v in m.items() if k != "offset"} | {"allocated": "offset" in m}
        last = merged[-1] if merged else None
        if last is not None and {**last, "start": 0, "length": 0} == {**m, "start": 0, "length": 0}:
            last["length"] += m["length"]
        else:
            merged.append(m)
    return merged


def unmap_flow(d: Path, discard: str, maps: list[dict[str, Any]]) -> list[Step]:
    """drive-mirror's `unmap` onto existing targets full of data; the source
    is opened with `discard` (the target inherits it). Where the source
    reads zeroes the target is unmapped (unmap=true) or gets allocated
    zeroes; a target opened with discard=unmap is zeroed first (not counted
    in the progress). `maps` receives the targets' qemu-img map."""
    steps: list[Step] = [cmd("blockdev-add", driver="qcow2", node_name="top", discard=discard,
                             file={"driver": "file", "filename": str(d / "top.qcow2")})]
    for unmap in (False, True):
        job = f"m-{unmap}"
        steps += [
            cmd("drive-mirror", job_id=job, device="top", target=str(d / f"t-{discard}-{str(unmap).lower()}.qcow2"),
                sync="full", mode="existing", format="qcow2", unmap=unmap),
            wait("BLOCK_JOB_READY", device=job),
            cmd("block-job-cancel", device=job),
            wait("JOB_STATUS_CHANGE", id=job, status="null"),
        ]
    steps += [cmd("blockdev-del", node_name="top"),
              ("call", lambda: maps.append({p.name: image_map(p) for p in sorted(d.glob(f"t-{discard}-*.qcow2"))}))]
    return steps


@pytest.mark.parametrize("discard", [
    "unmap",
    pytest.param("ignore", marks=pytest.mark.xfail(strict=True, reason=(
        "QEMU's qcow2 honours MAY_UNMAP on a job's (BlockBackend's) zero write whatever the node's discard "
        "option; exportd's qcow2 write_zeroes unmaps only with discard=unmap (server/exportd/block/qcow2)"))),
])
async def test_drive_mirror_unmap_same_as_qemu(tmp_path: Path, discard: str) -> None:
    maps: list[dict[str, Any]] = []
    await both(tmp_path, filled_targets, lambda d: unmap_flow(d, discard, maps))
    theirs, ours = maps
    assert ours == theirs, "\n".join(f"{k}:\n  ours   {ours[k]}\n  theirs {theirs[k]}" for k in ours)
    # the flag made a difference (else this test would prove nothing)
    assert theirs[f"t-{discard}-false.qcow2"] != theirs[f"t-{discard}-true.qcow2"]


def _small_fs(d: Path) -> Path:
    """d/small-fs: a 1 MiB tmpfs, mounted once and emptied for each daemon's turn."""
    small = d / "small-fs"
    small.mkdir(exist_ok=True)
    if not any(line.split()[1] == str(small) for line in Path("/proc/mounts").read_text().splitlines()):
        _tmpfs(small, "1M")
    else:
        for p in small.iterdir():
            p.unlink()
        _tmpfs(small, "1M", remount=True)
    return small


def full_top(d: Path) -> None:
    """The chain with top on a 1 MiB tmpfs: streaming 2 MiB into it fills it."""
    chain(d)
    top = _small_fs(d) / "top.qcow2"
    _qcow2(top, "4M", d / "mid.qcow2", "write -P 0x63 3M 512k")


def full_base(d: Path) -> None:
    """base (empty, on a 1 MiB tmpfs) <- mid (2 MiB of data) <- top: committing mid fills base."""
    for p in d.glob("*.qcow2"):
        p.unlink()
    base = _small_fs(d) / "base.qcow2"
    _qcow2(base, "4M")
    _qcow2(d / "mid.qcow2", "4M", base, "write -P 0x62 0 2M")
    _qcow2(d / "top.qcow2", "4M", d / "mid.qcow2", "write -P 0x63 3M 512k")


def stream_enospc_flow(d: Path) -> list[Step]:
    """block-stream on-error=enospc into a full top: BLOCK_JOB_ERROR, paused
    with io-status nospace; with room again, resume finishes it."""
    return [
        cmd("blockdev-add", driver="qcow2", node_name="top",
            file={"driver": "file", "filename": str(d / "small-fs" / "top.qcow2")}),
        cmd("block-stream", job_id="s", device="top", on_error="enospc"),
        wait("BLOCK_JOB_ERROR", device="s"),
        wait("JOB_STATUS_CHANGE", id="s", status="paused"),
        cmd("query-block-jobs"),
        ("call", lambda: _tmpfs(d / "small-fs", "16M", remount=True)),
        cmd("block-job-resume", device="s"),
        wait("JOB_STATUS_CHANGE", id="s", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


def commit_enospc_flow(d: Path) -> list[Step]:
    """An intermediate block-commit on-error=stop into a full base: the same."""
    return [
        add_top(d),
        cmd("block-commit", job_id="c", device="top", top=str(d / "mid.qcow2"),
            base=str(d / "small-fs" / "base.qcow2"), on_error="stop"),
        wait("BLOCK_JOB_ERROR", device="c"),
        wait("JOB_STATUS_CHANGE", id="c", status="paused"),
        cmd("query-block-jobs"),
        ("call", lambda: _tmpfs(d / "small-fs", "16M", remount=True)),
        cmd("block-job-resume", device="c"),
        wait("JOB_STATUS_CHANGE", id="c", status="null"),
        cmd("blockdev-del", node_name="top"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
@pytest.mark.parametrize(("make", "flow"), [(full_top, stream_enospc_flow), (full_base, commit_enospc_flow)])
async def test_stream_commit_on_error_same_as_qemu(tmp_path: Path, make: Callable[[Path], None],
                                                   flow: Callable[[Path], list[Step]]) -> None:
    try:
        await both(tmp_path, make, flow, numbers=False, normalize=io_status_only)
    finally:
        unmount_small_fs(tmp_path)


async def test_mirror_replaces_lost_same_as_qemu(tmp_path: Path) -> None:
    # QEMU drains (standby, ready) around the snapshot; exportd has no need to
    await both(tmp_path, chain, replaces_lost_flow, events=False, normalize=graph_shape)
