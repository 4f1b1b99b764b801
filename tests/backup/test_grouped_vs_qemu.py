"""`transaction` with `completion-mode: grouped` against qemu-storage-daemon
7.2 (tests/backup/differential.py): the backup jobs of one grouped
transaction form one QEMU JobTxn. A job that succeeds waits (`waiting`)
for the others; when all have, they go to `pending` and are finalized
together (one `job-finalize` for the group); when one fails or is
cancelled, the others are force-cancelled.

QEMU keeps a JobTxn's jobs newest first (job_txn_add_job inserts at the
head) and walks that list to move them to pending and to finalize them,
so the events of the second job of a transaction come before those of the
first. The flows below are made deterministic with rate limits (a job
with speed=1 copies its first chunk and then waits for a new speed or a
cancel); where QEMU's order still depends on timing, the flow says so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.backup.differential import add, both
from tests.backup.test_vs_qemu import images
from tests.blockjobs.test_vs_qemu import add_top, full_disk, unmount_small_fs
from tests.support.jobflow import Step, cmd, wait
from tests.support.qsd import QSD

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

GROUPED = {"completion-mode": "grouped"}


def backup(job: str, device: str, target: str, **extra: Any) -> dict[str, Any]:
    """A blockdev-backup transaction action (sync=full)."""
    args = {"job-id": job, "device": device, "target": target, "sync": "full"}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    return {"type": "blockdev-backup", "data": args}


def grouped(*actions: dict[str, Any]) -> Step:
    return cmd("transaction", actions=list(actions), properties=GROUPED)


def gone(job: str) -> Step:
    return wait("JOB_STATUS_CHANGE", id=job, status="null")


# --- (1) both succeed -------------------------------------------------------------------------
def success_flow(d: Path) -> list[Step]:
    """'a' finishes first and waits for 'b' (held back by its rate limit);
    once 'b' has finished too, both go to pending and finalize, 'b' first
    (QEMU's newest-first list). Then the same with the roles swapped, and
    the same as a drive-backup pair."""
    return [
        add(d, "src"), add(d, "full"), add(d, "t"),
        grouped(backup("a", "src", "full"), backup("b", "src", "t", speed=1)),
        wait("JOB_STATUS_CHANGE", id="a", status="waiting"),
        cmd("query-jobs"),
        cmd("block-job-set-speed", device="b", speed=0),
        gone("a"),  # 'a' is finalized last
        grouped(backup("c", "src", "full", speed=1), backup("e", "src", "t")),
        wait("JOB_STATUS_CHANGE", id="e", status="waiting"),
        cmd("block-job-set-speed", device="c", speed=0),
        gone("c"),
        cmd("transaction", properties=GROUPED, actions=[
            {"type": "drive-backup", "data": {"job-id": "d1", "device": "src", "sync": "full", "speed": 1,
                                              "target": str(d / "drive1.qcow2")}},
            {"type": "drive-backup", "data": {"job-id": "d2", "device": "src", "sync": "full",
                                              "target": str(d / "drive2.qcow2")}},
        ]),
        wait("JOB_STATUS_CHANGE", id="d2", status="waiting"),
        cmd("block-job-set-speed", device="d1", speed=0),
        gone("d1"),
        cmd("query-jobs"),
    ]


def progress_aside(reply: Any) -> Any:
    """query-jobs while a rate-limited job runs: how far it got by then is
    timing (its first chunk, or more); its state is not."""
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "current-progress" in ret[0]:
        return [{k: v for k, v in j.items() if k != "current-progress" or j["status"] != "running"} for j in ret]
    return reply


async def test_grouped_success_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, success_flow, normalize=progress_aside)


# --- (2) one fails, the other is cancelled ------------------------------------------------------
def failure_flow(d: Path) -> list[Step]:
    """'bad' writes to a 1 MiB tmpfs (ENOSPC, on-target-error=report),
    'ok' is held back by its rate limit: 'bad' fails (aborting), 'ok' is
    force-cancelled (aborting once its copy stopped), then both are
    finalized newest first: the failed one with BLOCK_JOB_COMPLETED and
    its error, the other with BLOCK_JOB_CANCELLED. Twice: 'bad' created
    second, then first. (QEMU announces 'ok' aborting before finalizing
    'bad' because finalizing drains the source, which lets 'ok' stop
    first; exportd waits for every cancelled job to stop before it
    finalizes any, which gives the same order.)"""
    def target(name: str) -> Step:
        return cmd("blockdev-add", driver="file", node_name=name, filename=str(d / "small-fs" / f"{name}.raw"))
    return [
        add_top(d), target("t"), add(d, "dst"),
        grouped(backup("ok", "top", "dst", speed=1), backup("bad", "top", "t", on_target_error="report")),
        gone("ok"),  # finalized last
        cmd("query-jobs"),
        cmd("blockdev-del", node_name="t"),
        ("call", lambda: (d / "small-fs" / "t.raw").unlink()),
        ("call", lambda: subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "small-fs" / "t2.raw"),
                                         "4M"], check=True)),
        target("t2"),
        grouped(backup("bad2", "top", "t2"), backup("ok2", "top", "dst", speed=1)),
        gone("bad2"),
        cmd("query-jobs"),
        cmd("blockdev-del", node_name="t2"),
    ]


def partial_copy_aside(d: Path) -> None:
    """The cancelled job's target holds what it copied before the other
    failed: the first chunk under its rate limit, or more, depending on
    when the failure came (QEMU's first chunk here is 512 KiB, of a
    source whose layers it reads by their own extents)."""
    (d / "dst.qcow2").unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
async def test_grouped_failure_cancels_the_others_same_as_qemu(tmp_path: Path) -> None:
    try:
        # progress figures aside: how much of the full disk was written
        # before ENOSPC is the file system's business
        await both(tmp_path, full_disk, failure_flow, numbers=False, after=partial_copy_aside)
    finally:
        unmount_small_fs(tmp_path)


# --- (3) auto-finalize=false: one job-finalize for the group -------------------------------------------
def finalize_flow(d: Path) -> list[Step]:
    """Both with auto-finalize=false: both pending (with BLOCK_JOB_PENDING),
    one job-finalize finalizes both. Then one job with auto-finalize and
    one without: nobody finalizes by itself; block-job-finalize of the
    automatic one finalizes both. Then a job-cancel of a pending job
    cancels the group."""
    manual = {"auto_finalize": False}
    return [
        add(d, "src"), add(d, "full"), add(d, "t"),
        grouped(backup("a", "src", "full", **manual), backup("b", "src", "t", speed=1, **manual)),
        wait("JOB_STATUS_CHANGE", id="a", status="waiting"),
        cmd("job-finalize", id="a"),  # waiting: not yet
        cmd("block-job-set-speed", device="b", speed=0),
        wait("BLOCK_JOB_PENDING", id="a"),
        cmd("query-jobs"),
        cmd("job-finalize", id="a"),
        gone("a"),
        grouped(backup("c", "src", "full", **manual), backup("e", "src", "t", speed=1)),
        wait("JOB_STATUS_CHANGE", id="c", status="waiting"),
        cmd("block-job-set-speed", device="e", speed=0),
        wait("BLOCK_JOB_PENDING", id="c"),
        ("sleep", 0.3),  # 'e' would have been finalized by now if it were alone
        cmd("query-jobs"),
        cmd("block-job-finalize", id="e"),
        gone("c"),
        grouped(backup("f", "src", "full", **manual), backup("g", "src", "t", speed=1, **manual)),
        wait("JOB_STATUS_CHANGE", id="f", status="waiting"),
        cmd("block-job-set-speed", device="g", speed=0),
        wait("BLOCK_JOB_PENDING", id="f"),  # the last one: 'g' is announced pending first
        cmd("job-cancel", id="g"),
        gone("f"),
        cmd("query-jobs"),
    ]


async def test_grouped_manual_finalize_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, finalize_flow, normalize=progress_aside)


# --- (4) actions that refuse grouped ----------------------------------------------------------------
def refusal_flow(d: Path) -> list[Step]:
    """QEMU 7.2 takes completion-mode grouped from blockdev-backup and
    drive-backup only; the snapshot and bitmap actions refuse it with
    QEMU's text, and a backup prepared before such an action is taken
    back (created, aborting, concluded, gone). (Two backups before a
    refused action hang qemu-storage-daemon 7.2: its rollback waits for a
    job that was never started; exportd's own test covers that case.)"""
    snap = {"type": "blockdev-snapshot-sync", "data": {"node-name": "src", "snapshot-file": str(d / "s.qcow2"),
                                                       "format": "qcow2"}}
    return [
        add(d, "src"), add(d, "full"), add(d, "t"),
        grouped(snap),
        grouped({"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}}),
        grouped(backup("a", "src", "full"), snap),
        gone("a"),
        grouped({"type": "abort", "data": {}}),
        grouped(backup("a", "src", "full"), {"type": "abort", "data": {}}),
        gone("a"),
        cmd("transaction", actions=[snap], properties={"completion-mode": "individual"}),
        cmd("query-jobs"),
        cmd("query-named-block-nodes"),
    ]


def node_names(reply: Any) -> Any:
    ret = reply.get("return")
    if isinstance(ret, list) and ret and "node-name" in ret[0]:
        return sorted(n["node-name"] for n in ret if not n["node-name"].startswith("#"))
    return reply


async def test_grouped_refusals_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, refusal_flow, normalize=node_names)


# --- (5) a cancel of one job cancels the group ----------------------------------------------------------
def cancel_flow(d: Path) -> list[Step]:
    """Both rate-limited: block-job-cancel of either one cancels both. The
    cancelled job announces aborting, then the other (once its copy
    stopped), then both are finalized newest first. A user's pause of the
    other one is lifted by the cancel (QEMU's job_cancel_async); one that
    already waits is cancelled at its finalization."""
    return [
        add(d, "src"), add(d, "full"), add(d, "t"),
        grouped(backup("a", "src", "full", speed=1), backup("b", "src", "t", speed=1)),
        ("sleep", 0.5),
        cmd("block-job-cancel", device="a"),
        gone("a"),
        grouped(backup("c", "src", "full", speed=1), backup("e", "src", "t", speed=1)),
        ("sleep", 0.5),
        cmd("block-job-cancel", device="e"),
        gone("c"),
        # one paused by the user: the cancel of the other ends the pause
        grouped(backup("p", "src", "full", speed=1), backup("q", "src", "t", speed=1)),
        ("sleep", 0.5),
        cmd("block-job-pause", device="p"),
        wait("JOB_STATUS_CHANGE", id="p", status="paused"),
        cmd("block-job-cancel", device="q"),
        gone("p"),
        # one already waiting when the other is cancelled: it is cancelled too
        grouped(backup("f", "src", "full"), backup("g", "src", "t", speed=1)),
        wait("JOB_STATUS_CHANGE", id="f", status="waiting"),
        cmd("block-job-cancel", device="g"),
        gone("f"),
        cmd("query-jobs"),
    ]


async def test_grouped_cancel_same_as_qemu(tmp_path: Path) -> None:
    await both(tmp_path, images, cancel_flow)
