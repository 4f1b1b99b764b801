"""A push backup taken while the node is written captures the node as it
was when the job started, exactly: fio writes (and verifies) through a
FUSE export of the source during a rate-limited full backup; the backup
must equal a copy of the image taken before the job, byte for byte, and
the source must hold what fio wrote. Also the pull side: a fleecing
overlay read over NBD while fio writes shows the start's data."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from tests.blockjobs.test_no_lost_writes import M, fio, qcow2, raw_of
from tests.support.daemon import Exportd
from tests.support.programs import arun, have

pytestmark = pytest.mark.skipif(not have("fio"), reason="fio missing")


def source_image(workdir: Path) -> bytes:
    """Data, zeroes and holes, and its raw copy before any daemon opens it."""
    src = workdir / "src.qcow2"
    qcow2(src, writes=("write -P 0x11 0 8M", "write -P 0x22 10M 6M", "write -z 12M 1M", "write -P 0x33 20M 3M"))
    return raw_of(src, workdir / "start.raw")


async def src_and_dst_exported(exportd: Exportd, workdir: Path) -> Path:
    """Nodes src (the image made already) and dst (a new qcow2), and src
    exported writable through FUSE: the mountpoint."""
    qcow2(workdir / "dst.qcow2")
    for node in ("src", "dst"):
        await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": node,
                                           "file": {"driver": "file", "filename": str(workdir / f"{node}.qcow2")}})
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "src", mnt, writable=True)
    return mnt


async def test_push_backup_under_fio_is_point_in_time(exportd: Exportd, workdir: Path) -> None:
    at_start = source_image(workdir)
    mnt = await src_and_dst_exported(exportd, workdir)
    # 24 MiB at 6 MiB/s: the job runs ~4 s, all of fio's write phase falls inside it
    await exportd.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst", "sync": "full",
                                          "speed": 6 * M})
    writer = asyncio.ensure_future(arun(fio(mnt), timeout=120))
    await asyncio.sleep(0.5)
    jobs = await exportd.cmd("query-block-jobs")
    assert jobs and jobs[0]["status"] == "running" and not writer.done(), "fio does not write during the job"
    finished, r = await asyncio.gather(exportd.event("BLOCK_JOB_COMPLETED", timeout=60), writer)
    assert "error" not in finished and r.returncode == 0, (finished, r.stdout[-2000:] + r.stderr[-2000:])
    shown = (await arun(["sha256sum", str(mnt)])).stdout.split()[0]
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    await exportd.cmd("blockdev-del", {"node-name": "dst"})
    backup = raw_of(workdir / "dst.qcow2", workdir / "backup.raw")
    assert backup == at_start, "the backup is not the source as it was when the job started"
    live = raw_of(workdir / "src.qcow2", workdir / "live.raw")
    assert hashlib.sha256(live).hexdigest() == shown
    assert live != at_start


async def test_fleecing_over_nbd_under_fio_is_point_in_time(exportd: Exportd, workdir: Path) -> None:
    at_start = source_image(workdir)
    qcow2(workdir / "scratch.qcow2", backing=workdir / "src.qcow2")
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                       "file": {"driver": "file", "filename": str(workdir / "src.qcow2")}})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "scratch", "backing": "src",
                                       "file": {"driver": "file", "filename": str(workdir / "scratch.qcow2")}})
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "src", mnt, writable=True)
    await exportd.cmd("blockdev-backup", {"job-id": "fleece", "device": "src", "target": "scratch", "sync": "none"})
    sock = workdir / "nbd.sock"
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "pull", "node-name": "scratch"})
    writer = asyncio.ensure_future(arun(fio(mnt), timeout=120))
    await asyncio.sleep(0.5)
    # the backup tool's read, while fio writes
    pulled = workdir / "pulled.raw"
    r = await arun(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///scratch?socket={sock}",
                    str(pulled)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert not writer.done(), "fio finished before the pull: the test would prove nothing"
    r = await writer
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert pulled.read_bytes() == at_start, "the pulled data is not the source as it was at the job's start"
    await exportd.cmd("block-export-del", {"id": "pull"})
    await exportd.event("BLOCK_EXPORT_DELETED")
    await exportd.cmd("block-job-cancel", {"device": "fleece"})
    await exportd.event("BLOCK_JOB_CANCELLED", timeout=30)
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "scratch"})
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    # the scratch image holds what copy-before-write saved, the rest reads
    # through to the source: together still the start's data
    assert raw_of(workdir / "scratch.qcow2", workdir / "scratch.raw") == at_start


async def test_backups_cancelled_and_done_under_fio_lose_no_write(exportd: Exportd, workdir: Path) -> None:
    """Backups start, are cancelled and finish while fio writes through the
    export: the filter comes and goes under writes in flight, none fails
    or goes astray (fio verifies all it wrote)."""
    source_image(workdir)
    mnt = await src_and_dst_exported(exportd, workdir)
    writer = asyncio.ensure_future(arun(fio(mnt), timeout=120))
    await asyncio.sleep(0.3)
    rounds = 0
    while not writer.done():
        await exportd.cmd("blockdev-backup", {"job-id": f"b{rounds}", "device": "src", "target": "dst",
                                              "sync": "full", "speed": 64 * M if rounds % 2 else 0})
        await asyncio.sleep(0.1)
        if rounds % 2:
            await exportd.cmd("block-job-cancel", {"device": f"b{rounds}"})
        ended = "BLOCK_JOB_CANCELLED" if rounds % 2 else "BLOCK_JOB_COMPLETED"
        await exportd.event(ended, timeout=60)
        rounds += 1
    r = await writer
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert rounds >= 4, rounds
    shown = (await arun(["sha256sum", str(mnt)])).stdout.split()[0]
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    await exportd.cmd("blockdev-del", {"node-name": "dst"})
    assert hashlib.sha256(raw_of(workdir / "src.qcow2", workdir / "live.raw")).hexdigest() == shown
