"""QMP commands of the backup job: blockdev-backup and drive-backup, each
also a transaction action (QEMU's blockdev_backup_action and
drive_backup_action: the single command is a transaction of one action).

prepare() makes the job, with its filter in the graph and its bitmap
busy, but does not start it; commit() starts it; abort() takes it out
again. Checks and texts follow QEMU's blockdev.c do_backup_common and
block/backup.c backup_job_create, in their order: the job id and the
speed are checked last, once the filter is in (so a refused command
changes nothing and announces no job)."""

from __future__ import annotations

import logging
from typing import Any

from exportd.block import bitmaps
from exportd.block.bitmaps import DirtyBitmap, Use
from exportd.block.graph import check_not_busy
from exportd.block.jobs.backup import BackupJob
from exportd.block.jobs.base import check_speed
from exportd.block.jobs.cbw import supports_compressed_writes
from exportd.block.node import BlockNode
from exportd.block.transaction import Action, run
from exportd.commands import command
from exportd.errors import BlockError
from exportd.jobs import JobStatus, registry_of

log = logging.getLogger(__name__)

INT_MAX = 2**31 - 1


def _lookup(graph: Any, name: str) -> BlockNode:
    node = graph.find(name)
    if node is None:
        raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _bitmap_checks(args: dict[str, Any], source: BlockNode) -> tuple[str, DirtyBitmap | None, str | None]:
    """do_backup_common's checks of sync, bitmap and bitmap-mode: (sync
    with incremental made bitmap, the bitmap, its mode)."""
    sync, name, mode = args["sync"], args.get("bitmap"), args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and name is None:
        raise BlockError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise BlockError(f"Bitmap sync mode must be 'on-success' when using sync mode '{sync}'")
        sync, mode = "bitmap", "on-success"
    bm = None
    if name is not None:
        bm = bitmaps.find(source, name)
        if bm is None:
            raise BlockError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise BlockError("Bitmap sync mode must be given when providing a bitmap")
        bm.check(Use.ALLOW_RO)
        if sync == "none":
            raise BlockError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise BlockError(f"Bitmap sync mode '{mode}' has no meaningful effect when combined with "
                             f"sync mode '{sync}'")
    if name is None and mode is not None:
        raise BlockError("Cannot specify bitmap sync mode without a bitmap")
    return sync, bm, mode


async def make_backup_job(daemon: Any, args: dict[str, Any], source: BlockNode, target: BlockNode) -> BackupJob:
    """do_backup_common and backup_job_create: the checks, then the job
    with its filter in the graph, registered (announced as created) but
    not started."""
    perf = args.get("x-perf", {})
    max_workers, max_chunk = perf.get("max-workers", 64), perf.get("max-chunk", 0)
    sync, bm, mode = _bitmap_checks(args, source)
    if source is target:
        raise BlockError("Source and target cannot be the same")
    compress = bool(args.get("compress", False))
    if compress and not supports_compressed_writes(target):
        # QEMU names the target's device here: a node has none
        raise BlockError("Compression is not supported for this drive ")
    check_not_busy(source, backing=False)
    check_not_busy(target, backing=False)
    if not 1 <= max_workers <= INT_MAX:
        raise BlockError(f"max-workers must be between 1 and {INT_MAX}")
    if max_chunk < 0:
        raise BlockError("max-chunk must be zero (which means no limit) or positive")
    if bm is not None and mode != "never":
        bm.check(Use.DEFAULT)
    if source.getlength() != target.getlength():
        raise BlockError("Source and target image have different sizes")
    job = BackupJob(daemon, args.get("job-id", ""), source, target, sync=sync, bitmap=bm, bitmap_mode=mode,
                    on_source_error=args.get("on-source-error", "report"),
                    on_target_error=args.get("on-target-error", "report"), max_chunk=max_chunk,
                    max_workers=max_workers, compress=compress,
                    auto_finalize=args.get("auto-finalize", True), auto_dismiss=args.get("auto-dismiss", True))
    try:  # the filter node is made as blockdev-add would, with its texts
        await job.setup(daemon.graph.new_node_name(args.get("filter-node-name")))
    except BlockError as e:
        raise BlockError(f"Could not create node: {e.desc}") from None
    try:
        if max_chunk and max_chunk < job.cluster:
            raise BlockError(f"Required max-chunk ({max_chunk}) is less than backup cluster size ({job.cluster})")
        registry_of(daemon).check_new_id(job.id)
    except BaseException:
        await job.teardown()
        raise
    registry_of(daemon).add(job)
    try:
        # QEMU sets the speed once the job exists: a bad one is announced
        # as a job created and gone
        speed = args.get("speed", 0)
        check_speed(speed)
        job.speed = job.rate.speed = speed
    except BaseException:
        await job.teardown()
        registry_of(daemon)._forget(job)
        raise
    return job


class _BackupAction(Action):
    supports_grouped = True  # the job joins the transaction's JobTxn (QEMU's backup_job_create)

    def __init__(self, graph: Any, data: dict[str, Any]) -> None:
        self.graph = graph
        self.daemon = graph.daemon
        self.data = data
        self.job: BackupJob | None = None

    def commit(self) -> None:
        assert self.job is not None
        self.job.start()

    def _join_txn(self) -> None:
        if self.job_txn is not None and self.job is not None:
            self.job_txn.add(self.job)

    async def abort(self) -> None:
        job, self.job = self.job, None
        if job is not None:
            job.txn.remove(job)
            try:
                await job.teardown()
            finally:
                # QEMU cancels the job it never started: aborting, concluded, gone
                job._transition(JobStatus.ABORTING)
                job._transition(JobStatus.CONCLUDED)
                registry_of(self.daemon)._forget(job)


class BlockdevBackupAction(_BackupAction):
    kind = "blockdev-backup"

    async def prepare(self) -> None:
        source = _lookup(self.graph, self.data["device"])
        target = _lookup(self.graph, self.data["target"])
        self.job = await make_backup_job(self.daemon, self.data, source, target)
        self._join_txn()


class DriveBackupAction(_BackupAction):
    """The target image is created (unless mode=existing) and opened here:
    sync=top gives it the source's backing file, sync=none the source
    itself as its backing node (a fleecing overlay)."""

    kind = "drive-backup"

    async def prepare(self) -> None:
        from exportd.aio.threads import in_own_thread
        from exportd.block.mkimage import create_image

        d = dict(self.data)
        graph = self.graph
        source = _lookup(graph, d["device"])
        mode = d.get("mode", "absolute-paths")
        fmt = d.get("format") or (source.driver if mode != "existing" else None)
        check_not_busy(source, backing=False)
        backing: BlockNode | None = None
        if d["sync"] == "top":
            backing = source.child("backing")
            if backing is None:
                d["sync"] = "full"
        elif d["sync"] == "none":
            backing = source
        if mode != "existing":
            await in_own_thread(create_image, d["target"], source.getlength(), "raw" if fmt == "file" else fmt,
                                backing=backing.filename() if backing is not None else None,
                                backing_fmt=backing.driver if backing is not None else None)
        if fmt is None:
            from exportd.block.probe import probe_format

            fmt = await in_own_thread(probe_format, d["target"])
        options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": d["target"]},
                                   "discard": "unmap", "detect-zeroes": "unmap"}
        if fmt == "file":
            options = {"driver": "file", "filename": d["target"], "discard": "unmap", "detect-zeroes": "unmap"}
        elif backing is not None and fmt != "raw":
            options["backing"] = None  # the backing node is the one in the graph, not a second opening
        target = await graph._open(options)  # owned by the job: it goes with it
        try:
            if "backing" in options:
                await graph.set_backing(target, backing)
            self.job = await make_backup_job(self.daemon, d, source, target)
            self._join_txn()
        except BaseException:
            if target.refcount == 0:
                await graph._destroy(target)
            raise


@command("blockdev-backup")
async def blockdev_backup(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await run([BlockdevBackupAction(daemon.graph, args)])
    return {}


@command("drive-backup")
async def drive_backup(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await run([DriveBackupAction(daemon.graph, args)])
    return {}


ACTIONS = {"blockdev-backup": BlockdevBackupAction, "drive-backup": DriveBackupAction}
