"""Differential tests of blockdev-backup and drive-backup: the same QMP
flows against qemu-storage-daemon 7.2 and exportd (tests/backup/
differential.py); replies, job events with their progress figures, and the
backup images (qemu-img compare) must be the same."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.backup.differential import add, both, guest_write, nbd_export, qcow2, save_export
from tests.blockjobs.test_vs_qemu import (
    _tmpfs,
    add_top,
    full_disk,
    graph_shape,
    io_status_only,
    unmount_small_fs,
)
from tests.support.jobflow import Step, cmd, wait
from tests.support.nbdpeer import nbdkit
from tests.support.qsd import QSD

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")


def images(d: Path) -> None:
    """src: data at 0-1M, a zero cluster at 2M; empty 4M targets; a 1M one; a raw one."""
    qcow2(d / "src.qcow2", "4M", "write -P 0x61 0 1M", "write -z 2M 64k", "write -P 0x62 3M 128k")
    for name in ("full", "inc1", "inc2", "t"):
        qcow2(d / f"{name}.qcow2", "4M")
    qcow2(d / "small.qcow2", "1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "raw.raw"), "4M"], check=True)


def bitmap(node: str, name: str, **opts: Any) -> Step:
    return ("cmd", "block-dirty-bitmap-add", {"node": node, "name": name, **opts})


def sha(node: str, name: str) -> Step:
    return ("cmd", "x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})


def done(job: str) -> Step:
    return wait("JOB_STATUS_CHANGE", id=job, status="null")


def bitmap_facts(reply: Any, *, busy: bool = True) -> Any:
    """query-named-block-nodes: only the nodes' dirty bitmaps (the rest is
    the node query's business, tested elsewhere); QEMU's anonymous bitmaps
    (a filter's copy state) are not exportd's. Without `busy` that flag is
    left out."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and isinstance(ret[0], dict) and "node-name" in ret[0]:
        return sorted((n["node-name"], json.dumps([{k: v for k, v in b.items() if busy or k != "busy"}
                                                    for b in n.get("dirty-bitmaps", []) if "name" in b],
                                                   sort_keys=True))
                      for n in ret if not n["node-name"].startswith("#") and n["drv"] != "copy-before-write")
    return reply


# --- refusals ------------------------------------------------------------------------------
def errors_flow(d: Path) -> list[Step]:
    b = {"device": "src", "target": "t"}
    return [
        add(d, "src"), add(d, "t"), add(d, "small"), add(d, "raw", "raw"), add(d, "full"),
        bitmap("src", "b0"),
        cmd("blockdev-backup", sync="full", **b),
        cmd("blockdev-backup", job_id="j", device="nope", target="t", sync="full"),
        cmd("blockdev-backup", job_id="j", device="src", target="nope", sync="full"),
        cmd("blockdev-backup", job_id="j", device="src", target="src", sync="full"),
        cmd("blockdev-backup", job_id="j", device="src", target="small", sync="full"),
        cmd("blockdev-backup", job_id="j", sync="incremental", **b),
        cmd("blockdev-backup", job_id="j", sync="bitmap", **b),
        cmd("blockdev-backup", job_id="j", sync="incremental", bitmap="b0", bitmap_mode="never", **b),
        cmd("blockdev-backup", job_id="j", sync="bitmap", bitmap="nope", bitmap_mode="always", **b),
        cmd("blockdev-backup", job_id="j", sync="bitmap", bitmap="b0", **b),
        cmd("blockdev-backup", job_id="j", sync="none", bitmap="b0", bitmap_mode="always", **b),
        cmd("blockdev-backup", job_id="j", sync="full", bitmap="b0", bitmap_mode="never", **b),
        cmd("blockdev-backup", job_id="j", sync="top", bitmap="b0", bitmap_mode="never", **b),
        cmd("blockdev-backup", job_id="j", sync="full", bitmap_mode="never", **b),
        cmd("blockdev-backup", job_id="j", device="src", target="raw", sync="full", compress=True),
        cmd("blockdev-backup", job_id="j", sync="full", speed=-1, **b),
        cmd("blockdev-backup", job_id="1j", sync="full", **b),
        cmd("blockdev-backup", job_id="j", sync="full", x_perf={"max-workers": 0}, **b),
        cmd("blockdev-backup", job_id="j", sync="full", x_perf={"max-chunk": -1}, **b),
        cmd("blockdev-backup", job_id="j", sync="full", x_perf={"max-chunk": 4096}, **b),
        cmd("blockdev-backup", job_id="j", sync="full", filter_node_name="src", **b),
        cmd("blockdev-backup", job_id="j", sync="full", filter_node_name="1x", **b),
        cmd("query-named-block-nodes"),
        # a running (rate-limited) backup: what it refuses, then cancelled
        # (its own id: a refused 'j' above left a 'null' event a wait for 'j' would take)
        cmd("blockdev-backup", job_id="bk", sync="full", speed=1, filter_node_name="cbw", bitmap="b0",
            bitmap_mode="on-success", **b),
        ("sleep", 1),  # its first chunk is copied (then the rate limit holds it)
        cmd("blockdev-backup", job_id="bk", device="src", target="raw", sync="full"),
        cmd("blockdev-backup", job_id="j2", device="src", target="raw", sync="full", bitmap="b0",
            bitmap_mode="always"),
        cmd("blockdev-backup", job_id="j2", device="t", target="raw", sync="full"),
        cmd("blockdev-backup", job_id="j2", device="full", target="t", sync="full"),
        cmd("blockdev-del", node_name="src"),
        cmd("blockdev-del", node_name="t"),
        cmd("blockdev-del", node_name="cbw"),
        ("cmd", "block-dirty-bitmap-clear", {"node": "src", "name": "b0"}),
        ("cmd", "block-dirty-bitmap-remove", {"node": "src", "name": "b0"}),
        cmd("query-named-block-nodes"),
        cmd("query-block-jobs"),
        cmd("block-job-cancel", device="bk"),
        done("bk"),
        cmd("query-named-block-nodes"),
        cmd("blockdev-del", node_name="t"),
    ]


async def test_errors_same_as_qemu(tmp_path: Path) -> None:
    # qemu-storage-daemon 7.2 now and then lists the bitmap of its running,
    # rate-limited backup as not busy (about 1 run in 8) while refusing it
    # to another backup as busy; the refusal is compared, the flag is not
    await both(tmp_path, images, errors_flow, normalize=lambda r: bitmap_facts(r, busy=False))


# --- full, top, drive-backup, transaction --------------------------------------------------
def full_flow(d: Path) -> list[Step]:
    return [
        add(d, "src"), add(d, "full"), add(d, "t"),
        cmd("blockdev-backup", job_id="f", device="src", target="full", sync="full", auto_dismiss=False),
        wait("JOB_STATUS_CHANGE", id="f", status="concluded"),
        cmd("query-block-jobs"),
        cmd("job-dismiss", id="f"),
        cmd("blockdev-backup", job_id="top", device="src", target="t", sync="top", auto_finalize=False),
        wait("BLOCK_JOB_PENDING", id="top"),
        cmd("query-jobs"),
        cmd("job-finalize", id="top"),
        done("top"),
        cmd("drive-backup", job_id="d1", device="src", target=str(d / "drive-full.qcow2"), sync="full"),
        done("d1"),
        cmd("drive-backup", job_id="d2", device="src", target=str(d / "drive-raw.raw"), sync="full", format="raw"),
        done("d2"),
        cmd("drive-backup", job_id="d3", device="src", target=str(d / "inc1.qcow2"), sync="full", mode="existing"),
        done("d3"),
        cmd("drive-backup", job_id="d4", device="src", target=str(d / "nope" / "x.qcow2"), sync="full"),
        # no backing file: top is full; none makes a fleecing overlay of the source
        cmd("drive-backup", job_id="d5", device="src", target=str(d / "drive-top.qcow2"), sync="top"),
        done("d5"),
        cmd("drive-backup", job_id="d6", device="src", target=str(d / "drive-none.qcow2"), sync="none"),
        cmd("query-block-jobs"),
        cmd("block-job-cancel", device="d6"),
        done("d6"),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
            {"type": "blockdev-backup", "data": {"job-id": "tx", "device": "src", "target": "t", "sync": "full"}},
        ]),
        done("tx"),
        cmd("transaction", actions=[
            {"type": "blockdev-backup", "data": {"job-id": "tx2", "device": "src", "target": "t", "sync": "full"}},
            {"type": "abort", "data": {}},
        ]),
        cmd("query-named-block-nodes"),
        # the verbs on a backup: pause, resume, a new speed
        cmd("blockdev-backup", job_id="v", device="src", target="t", sync="full", speed=1),
        ("sleep", 1),
        cmd("block-job-pause", device="v"),
        wait("JOB_STATUS_CHANGE", id="v", status="paused"),
        cmd("query-block-jobs"),
        cmd("block-job-complete", device="v"),
        cmd("block-job-resume", device="v"),
        cmd("block-job-set-speed", device="v", speed=0),
        done("v"),
        cmd("blockdev-del", node_name="full"),
        cmd("blockdev-del", node_name="t"),
        cmd("blockdev-del", node_name="src"),
    ]


async def test_full_top_drive_and_transaction_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, full_flow, normalize=bitmap_facts)


# --- incremental chains and bitmap modes ----------------------------------------------------
def incremental_flow(d: Path) -> list[Step]:
    """Full backup and a bitmap in one transaction, then guest writes (data,
    zeroes, a discard) and an incremental backup, twice: the images, the
    bitmap after each step and the job events must match QEMU's."""
    return [
        add(d, "src", discard="unmap"), add(d, "full"), add(d, "inc1"), add(d, "inc2"),
        *nbd_export(d, "src", writable=True),
        cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
            {"type": "blockdev-backup", "data": {"job-id": "f", "device": "src", "target": "full", "sync": "full"}},
        ]),
        done("f"),
        guest_write(d, "src", "write -P 0x71 64k 64k", "write -P 0x72 1500k 100k", "write -z 3M 64k",
                    "discard 0 64k"),
        cmd("query-named-block-nodes"),
        sha("src", "b"),
        save_export(d, "src", "checkpoint1.raw"),
        cmd("blockdev-backup", job_id="i1", device="src", target="inc1", sync="incremental", bitmap="b"),
        done("i1"),
        cmd("query-named-block-nodes"),
        guest_write(d, "src", "write -P 0x73 2M 192k", "write -P 0x74 4032k 64k"),
        save_export(d, "src", "checkpoint2.raw"),
        cmd("blockdev-backup", job_id="i2", device="src", target="inc2", sync="bitmap", bitmap="b",
            bitmap_mode="on-success"),
        done("i2"),
        cmd("query-named-block-nodes"),
        sha("src", "b"),
        cmd("block-export-del", id="e-src"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


def restore(d: Path) -> None:
    """full + inc1 + inc2 as a chain (rebase -u), flattened: it must be
    the live image at the last checkpoint, byte for byte."""
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(d / "full.qcow2"), "-F", "qcow2",
                    str(d / "inc1.qcow2")], check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(d / "inc1.qcow2"), "-F", "qcow2",
                    str(d / "inc2.qcow2")], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "inc2.qcow2"), str(d / "restored.raw")], check=True)
    assert (d / "restored.raw").read_bytes() == (d / "checkpoint2.raw").read_bytes(), d
    # and the first checkpoint from full + inc1
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "inc1.qcow2"), str(d / "restored1.raw")], check=True)
    assert (d / "restored1.raw").read_bytes() == (d / "checkpoint1.raw").read_bytes(), d


async def test_incremental_chain_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, incremental_flow, normalize=bitmap_facts, after=restore)


def cancelled_bitmap_backup(d: Path, job: str, mode: str, *writes: str) -> list[Step]:
    """A rate-limited sync=bitmap backup: it copies its first 1 MiB, the
    guest writes, the job is cancelled; then the bitmap."""
    return [
        cmd("blockdev-backup", job_id=job, device="src", target="t", sync="bitmap", bitmap="b",
            bitmap_mode=mode, speed=1),
        ("sleep", 1),
        *([guest_write(d, "src", *writes)] if writes else []),
        cmd("block-job-cancel", device=job),
        done(job),
        cmd("query-named-block-nodes"),
        sha("src", "b"),
    ]


def bitmap_modes_flow(d: Path) -> list[Step]:
    """never (bitmap kept), always after a cancel (bitmap = writes during
    the job + what was not copied), on-success after a cancel (kept), a
    disabled bitmap; sync=full with a bitmap clears it."""
    return [
        add(d, "src"), add(d, "t"), add(d, "full"),
        *nbd_export(d, "src", writable=True),
        bitmap("src", "b"), bitmap("src", "off", disabled=True),
        guest_write(d, "src", "write -P 0x71 0 1536k", "write -P 0x72 3M 64k"),
        cmd("blockdev-backup", job_id="n", device="src", target="t", sync="bitmap", bitmap="b", bitmap_mode="never"),
        done("n"),
        cmd("query-named-block-nodes"),
        sha("src", "b"),
        *cancelled_bitmap_backup(d, "a", "always", "write -P 0x73 2M 64k"),
        *cancelled_bitmap_backup(d, "s", "on-success"),
        cmd("blockdev-backup", job_id="full", device="src", target="full", sync="full", bitmap="b",
            bitmap_mode="on-success"),
        done("full"),
        cmd("query-named-block-nodes"),
        ("cmd", "block-dirty-bitmap-merge", {"node": "src", "target": "off", "bitmaps": ["b"]}),
        cmd("blockdev-backup", job_id="off", device="src", target="t", sync="incremental", bitmap="off"),
        ("sleep", 0.2),
        guest_write(d, "src", "write -P 0x74 1M 64k"),
        done("off"),
        cmd("query-named-block-nodes"),
        cmd("block-export-del", id="e-src"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


async def test_bitmap_modes_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, bitmap_modes_flow, normalize=bitmap_facts)


# --- pull mode: fleecing -------------------------------------------------------------------
def fleece_images(d: Path) -> None:
    images(d)
    qcow2(d / "scratch.qcow2", "4M", backing=d / "src.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "src.qcow2"), str(d / "at-start.raw")], check=True)


def fleecing_flow(d: Path) -> list[Step]:
    """libvirt's pull-mode backup of QEMU < 7.1: a scratch overlay whose
    backing node is the live node, a sync=none backup into it, the scratch
    exported over NBD; while the node is written, the export shows the
    node as it was."""
    return [
        add(d, "src"),
        cmd("blockdev-add", driver="qcow2", node_name="scratch", backing="src",
            file={"driver": "file", "filename": str(d / "scratch.qcow2")}),
        *nbd_export(d, "src", writable=True),
        cmd("block-export-add", type="nbd", id="e-scratch", node_name="scratch"),
        cmd("blockdev-backup", job_id="fleece", device="src", target="scratch", sync="none"),
        guest_write(d, "src", "write -P 0x71 32k 64k", "write -z 2M 128k", "write -P 0x72 3M 1M", "discard 0 4k"),
        save_export(d, "scratch", "fleeced.raw"),
        save_export(d, "src", "live.raw"),
        cmd("query-block-jobs"),
        cmd("block-job-cancel", device="fleece"),
        done("fleece"),
        cmd("block-export-del", id="e-scratch"),
        wait("BLOCK_EXPORT_DELETED"),
        cmd("blockdev-del", node_name="scratch"),
        cmd("block-export-del", id="e-src"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


def fleeced_is_point_in_time(d: Path) -> None:
    assert (d / "fleeced.raw").read_bytes() == (d / "at-start.raw").read_bytes()
    assert (d / "live.raw").read_bytes() != (d / "at-start.raw").read_bytes()


def job_progress_aside(reply: Any) -> Any:
    """query-block-jobs of a fleecing job: how many bytes copy-before-write
    saved depends on the write pattern's split into requests (equal here),
    but QEMU's 'busy' flag is about its coroutine."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "busy" in ret[0]:
        return [{k: v for k, v in j.items() if k != "busy"} for j in ret]
    return reply


async def test_fleecing_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, fleece_images, fleecing_flow, normalize=job_progress_aside, after=fleeced_is_point_in_time)


# --- the graph while a backup runs ------------------------------------------------------------
def graph_flow(d: Path) -> list[Step]:
    """The copy-before-write filter between the source and its export, its
    'file' and 'target' children, the job's edges; all gone afterwards."""
    return [
        add(d, "src"), add(d, "t"),
        *nbd_export(d, "src", writable=True),
        cmd("blockdev-backup", job_id="b", device="src", target="t", sync="full", speed=1, filter_node_name="cbw"),
        cmd("x-debug-query-block-graph"),
        cmd("block-job-cancel", device="b"),
        done("b"),
        cmd("x-debug-query-block-graph"),
        cmd("block-export-del", id="e-src"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


async def test_graph_during_backup_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, graph_flow, normalize=graph_shape, numbers=False)


# --- I/O errors ---------------------------------------------------------------------------------
def enospc_flow(d: Path) -> list[Step]:
    """A full target: on-target-error=stop pauses the job with io-status
    nospace and BLOCK_JOB_ERROR; once there is room, resume finishes it."""
    return [
        add_top(d),
        cmd("blockdev-add", driver="file", node_name="t", filename=str(d / "small-fs" / "t.raw")),
        cmd("blockdev-backup", job_id="b", device="top", target="t", sync="full", on_target_error="stop"),
        wait("BLOCK_JOB_ERROR", device="b"),
        ("sleep", 0.5),
        cmd("query-block-jobs"),
        ("call", lambda: _tmpfs(d / "small-fs", "16M", remount=True)),
        cmd("block-job-resume", device="b"),
        done("b"),
        cmd("blockdev-del", node_name="t"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
async def test_enospc_stop_and_resume_same_as_qemu(tmp_path: Path) -> None:
    try:
        await both(tmp_path, full_disk, enospc_flow, numbers=False, normalize=io_status_only)
    finally:
        unmount_small_fs(tmp_path)


# --- compress ---------------------------------------------------------------------------------
def compress_images(d: Path) -> None:
    """src: compressible data (0-1M), incompressible data (1M-1.5M), a zero
    cluster (2M), a pattern (3M); empty qcow2 targets with 64 KiB and
    4 KiB clusters; one that holds data already; a raw one."""
    rng = random.Random(14)
    words = [rng.randbytes(6).hex().encode() for _ in range(50)]
    text = b" ".join(rng.choice(words) for _ in range(200_000))[: 1 << 20]
    (d / "src.raw").write_bytes(text + rng.randbytes(512 << 10))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(d / "src.raw"), str(d / "src.qcow2")],
                   check=True)
    (d / "src.raw").unlink()
    subprocess.run(["qemu-img", "resize", "-q", str(d / "src.qcow2"), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 2M 64k", "-c", "write -P 0x62 3M 128k",
                    str(d / "src.qcow2")], check=True, capture_output=True)
    qcow2(d / "c64.qcow2", "4M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(d / "c4.qcow2"),
                    "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(d / "cz.qcow2"),
                    "4M"], check=True)
    qcow2(d / "used.qcow2", "4M", "write -P 0x55 1M 64k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "raw.raw"), "4M"], check=True)


def compress_flow(d: Path) -> list[Step]:
    """Compressed full backups into qcow2 targets (64 KiB and 4 KiB
    clusters, zstd, drive-backup's new image), a guest write while one runs
    (copy-before-write compresses too), a target with data already (QEMU's
    compressed write never overwrites: the job fails), a raw target
    (refused)."""
    return [
        add(d, "src"), add(d, "c64"), add(d, "c4"), add(d, "cz"), add(d, "used"), add(d, "raw", "raw"),
        *nbd_export(d, "src", writable=True),
        cmd("blockdev-backup", job_id="j", device="src", target="raw", sync="full", compress=True),
        cmd("blockdev-backup", job_id="b64", device="src", target="c64", sync="full", compress=True, speed=1),
        ("sleep", 0.5),
        save_export(d, "src", "at-start.raw"),
        guest_write(d, "src", "write -P 0x71 3M 64k", "write -z 0 64k"),
        cmd("block-job-set-speed", device="b64", speed=0),
        done("b64"),
        cmd("blockdev-backup", job_id="b4", device="src", target="c4", sync="full", compress=True),
        done("b4"),
        cmd("blockdev-backup", job_id="bz", device="src", target="cz", sync="full", compress=True),
        done("bz"),
        cmd("drive-backup", job_id="d", device="src", target=str(d / "drive.qcow2"), sync="full", compress=True),
        done("d"),
        cmd("blockdev-backup", job_id="u", device="src", target="used", sync="full", compress=True),
        done("u"),
        cmd("block-export-del", id="e-src"),
        wait("BLOCK_EXPORT_DELETED"),
    ]


def compressed_clusters(img: Path, cs: int) -> set[int]:
    """Guest clusters qemu-img map shows compressed (data without a host offset)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(img)], capture_output=True, text=True,
                         check=True).stdout
    return {c for e in json.loads(out) if e["data"] and "offset" not in e
            for c in range(e["start"], e["start"] + e["length"], cs)}


def compressed_as_start(d: Path) -> None:
    """The first backup holds the disk as it was when it started, also
    after the guest wrote; every result converts back to the data."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "c64.qcow2"), str(d / "c64-back.raw")], check=True)
    assert (d / "c64-back.raw").read_bytes() == (d / "at-start.raw").read_bytes()
    (d / "c64-back.raw").unlink()


async def test_compress_same_as_qemu(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")  # exportd's zstd (an optional extra)
    theirs, ours = await both(tmp_path, compress_images, compress_flow, after=compressed_as_start)
    for name, cs in (("c64.qcow2", 65536), ("c4.qcow2", 4096), ("cz.qcow2", 65536), ("drive.qcow2", 65536)):
        a, b = compressed_clusters(theirs / name, cs), compressed_clusters(ours / name, cs)
        assert a == b and a, (name, sorted(a ^ b))
        # the same deflate parameters and packing: about the same file
        sa, sb = (theirs / name).stat().st_size, (ours / name).stat().st_size
        assert abs(sa - sb) <= 2 * cs + (64 << 10), (name, sa, sb)


# --- on-target-error and on-source-error ----------------------------------------------------------
def target_holds_source(d: Path) -> None:
    """After a job that went on (ignore) or resumed (stop, enospc) past a
    full disk, the target holds the whole source."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "top.qcow2"), str(d / "top.raw")], check=True)
    assert (d / "small-fs" / "t.raw").read_bytes() == (d / "top.raw").read_bytes()
    (d / "top.raw").unlink()


def enospc_policy_flow(policy: str) -> Callable[[Path], list[Step]]:
    """A target on a full tmpfs with on-target-error=`policy`: report fails
    the job; ignore retries (one BLOCK_JOB_ERROR counted) until there is
    room; enospc stops on ENOSPC (as stop does) until resumed."""
    def flow(d: Path) -> list[Step]:
        room = ("call", lambda: _tmpfs(d / "small-fs", "16M", remount=True))
        steps: list[Step] = [
            add_top(d),
            cmd("blockdev-add", driver="file", node_name="t", filename=str(d / "small-fs" / "t.raw")),
            cmd("blockdev-backup", job_id="b", device="top", target="t", sync="full", on_target_error=policy),
            wait("BLOCK_JOB_ERROR", device="b"),
        ]
        if policy == "report":
            steps += [done("b")]
        elif policy == "ignore":
            steps += [("sleep", 0.3), cmd("query-block-jobs"), room, done("b")]
        else:
            steps += [("sleep", 0.5), cmd("query-block-jobs"), room, cmd("block-job-resume", device="b"), done("b")]
        return [*steps, cmd("blockdev-del", node_name="t")]
    return flow


def running_or_stopped(reply: Any) -> Any:
    """query-block-jobs of a job that ignores errors: its io-status (QEMU
    keeps the last error's) and whether it runs; the rest is timing."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "io-status" in ret[0]:
        return [{k: j[k] for k in ("device", "paused", "io-status", "ready")} for j in ret]
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
@pytest.mark.parametrize("policy", ["report", "ignore", "enospc"])
async def test_on_target_error_same_as_qemu(tmp_path: Path, policy: str) -> None:
    try:
        await both(tmp_path, full_disk, enospc_policy_flow(policy), numbers=False, normalize=running_or_stopped,
                   after=(lambda d: None) if policy == "report" else target_holds_source)
    finally:
        unmount_small_fs(tmp_path)


def failing_source(tmp_path: Path) -> Path:
    """src.raw (data at 0-1M and 3M), to be served by nbdkit through its
    error filter (to both daemons, one after the other): every read fails
    with EIO while the file `fail-reads` next to it exists."""
    src = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 3M 128k", str(src)],
                   check=True, capture_output=True)
    return src


def source_error_flow(policy: str) -> Callable[[Path], list[Step]]:
    def flow(d: Path) -> list[Step]:
        trigger = d.parent / "fail-reads"
        steps: list[Step] = [
            ("call", trigger.touch),
            cmd("blockdev-add", driver="nbd", node_name="src",
                server={"type": "unix", "path": str(d.parent / "nbdkit.sock")}),
            add(d, "t"),
            cmd("blockdev-backup", job_id="b", device="src", target="t", sync="full", on_source_error=policy),
            wait("BLOCK_JOB_ERROR", device="b"),
        ]
        if policy == "report":
            steps += [done("b")]
        elif policy == "ignore":
            steps += [("sleep", 0.3), ("call", trigger.unlink), done("b")]
        else:
            steps += [("sleep", 0.5), cmd("query-block-jobs"), ("call", trigger.unlink),
                      cmd("block-job-resume", device="b"), done("b")]
        return [*steps, cmd("blockdev-del", node_name="t"), cmd("blockdev-del", node_name="src")]
    return flow


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
async def test_on_source_error_same_as_qemu(tmp_path: Path, policy: str) -> None:
    """A source whose reads fail (nbdkit's error filter behind an NBD
    node: the same failure for both daemons, where QEMU would use
    blkdebug, which exportd does not have)."""
    src = failing_source(tmp_path)
    peer = nbdkit(str(tmp_path / "nbdkit.sock"), "--filter=error", "file", str(src),
                  "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={tmp_path / 'fail-reads'}",
                  log=tmp_path / "nbdkit.log").start()
    try:
        theirs, ours = await both(tmp_path, images, source_error_flow(policy), numbers=False,
                                  normalize=running_or_stopped)
    finally:
        peer.stop()
    if policy != "report":
        for d in (theirs, ours):
            subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src),
                            str(d / "t.qcow2")], check=True)


# --- drive-backup as a transaction action ---------------------------------------------------------
def drive_transaction_flow(d: Path) -> list[Step]:
    """drive-backup in transactions: with a bitmap add (committed), with an
    abort (its image is made, then the action undone), with a target that
    cannot be created (the bitmap add is undone too)."""
    def drive(job: str, name: str, **extra: Any) -> dict[str, Any]:
        return {"type": "drive-backup", "data": {"job-id": job, "device": "src", "target": str(d / name),
                                                 "sync": "full", **extra}}
    return [
        add(d, "src"),
        cmd("transaction", actions=[{"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
                                    drive("d1", "tx-full.qcow2")]),
        done("d1"),
        cmd("transaction", actions=[drive("d2", "tx-raw.raw", format="raw"), {"type": "abort", "data": {}}]),
        cmd("transaction", actions=[{"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "c"}},
                                    drive("d3", "nope/x.qcow2")]),
        cmd("transaction", actions=[drive("d4", "tx-inc.qcow2", sync="incremental", bitmap="b"),
                                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "c"}}]),
        done("d4"),
        cmd("query-named-block-nodes"),
        cmd("query-block-jobs"),
    ]


async def test_drive_backup_transaction_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, drive_transaction_flow, normalize=bitmap_facts)
