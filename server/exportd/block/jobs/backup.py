"""The backup job (blockdev-backup, drive-backup): a copy of a node as it
was when the job started, taken while the node keeps being written
(QEMU's block/backup.c).

A copy-before-write filter goes above the source (cbw.py). The job's
background pass copies every cluster the sync mode asks for (full: all;
top: what the source's own layer holds; bitmap: the dirty bitmap's
clusters; none: nothing, only what the filter saves before a write, the
"fleecing" of pull-mode backups); the filter copies a cluster's old data
first whenever a write is about to change it.

A sync bitmap is busy during the job. Writes during the job are recorded
in a successor (QEMU's bdrv_dirty_bitmap_create_successor); at the end,
as bitmap-mode says, the bitmap becomes the successor (on-success after a
success, always: also after a failure, plus what was not copied) or stays
what it was plus the successor (never, or a failure). exportd keeps the
bitmap itself recording during the job, so "what it was plus the
successor" is the bitmap as it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from exportd.block import bitmaps
from exportd.block.bitmaps import DirtyBitmap
from exportd.block.chain import allocated_above
from exportd.block.dirtymap import DirtyMap
from exportd.block.jobs.base import BlockJob
from exportd.block.jobs.cbw import (
    MAX_CHUNK,
    MAX_IN_FLIGHT,
    BlockCopy,
    CopyBeforeWriteFilter,
    CopyError,
    PointInTimeView,
    cluster_size,
)
from exportd.block.node import BlockNode, Edge, Perm

log = logging.getLogger(__name__)


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(self, daemon: Any, job_id: str, source: BlockNode, target: BlockNode, *, sync: str,
                 bitmap: DirtyBitmap | None = None, bitmap_mode: str | None = None,
                 on_source_error: str = "report", on_target_error: str = "report",
                 max_chunk: int = 0, max_workers: int = 64, compress: bool = False, **kwargs: Any) -> None:
        super().__init__(daemon, job_id, **kwargs)
        self.source = source
        self.target = target
        self.sync = sync  # full, top, bitmap, none (incremental is bitmap + on-success)
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.max_chunk = max_chunk
        self.max_workers = max_workers
        self.bcs = BlockCopy(source, target, cluster_size(target), compress=compress)
        self.filter: CopyBeforeWriteFilter | None = None
        self.view: PointInTimeView | None = None  # the target's backing node while fleecing
        self.main_edge: Edge | None = None
        self.target_edge: Edge | None = None
        self.successor: DirtyMap | None = None  # writes to the source during the job
        self._successor_records = False
        self._older_bitmaps: set[int] = set()  # ids of the node's bitmaps when the job was made

    @property
    def cluster(self) -> int:
        return self.bcs.cluster

    # --- set-up (inside the command; undone by teardown() if the command fails later) --
    async def setup(self, filter_node_name: str) -> None:
        """Put the filter (named `filter_node_name`, already checked) above
        the source; a BlockError (a permission conflict) changes nothing."""
        graph = self.graph
        filt = CopyBeforeWriteFilter(filter_node_name, self, self.bcs)
        # the filter writes the target, its 'target' child as in QEMU (so a
        # target whose backing node is the source keeps that edge where it is)
        self.target_edge = self.target.attach(filt, Perm.WRITE, Perm.ALL & ~Perm.RESIZE, "target")
        filt.child_edges["target"] = self.target_edge
        try:
            graph.insert_filter(self.source, filt, "file")
        except BaseException:
            del filt.child_edges["target"]
            self.target.detach(self.target_edge)
            self.target_edge = None
            raise
        self.filter = filt
        try:
            # the job's own edges block other operations on its nodes; the
            # source keeps its length while the job runs (its copy state is fixed)
            self.main_edge = self.hold(filt, "main node", Perm(0), Perm.ALL & ~Perm.RESIZE)
            self.hold(self.target, "target", Perm(0), Perm.ALL)
            backing = self.target.child_edges.get("backing")
            if backing is not None and backing.node is self.source:
                self._view_backing(backing)
        except BaseException:
            await self.teardown()
            raise
        length = self.bcs.length
        self.bcs.zeroes_allocated |= self.sync in ("bitmap", "top")
        if self.sync == "bitmap":
            assert self.bitmap is not None
            self.bcs.dirty.merge(self.bitmap.bits)
        else:
            self.bcs.dirty.mark(0, length)
        if self.bitmap is not None:
            self.bitmap.busy = True
            # QEMU's successor is a bitmap made now: newer than these
            self._older_bitmaps = {id(b) for b in self.bitmap.node.dirty_bitmaps}
            self.successor = DirtyMap(self.bitmap.bits.length, self.bitmap.granularity)
            self._successor_records = self.bitmap.enabled
        self.total_progress = self.bcs.dirty.dirty_bytes()
        filt.before_write = self._copy_before_write
        filt.after_write = self._written

    def _view_backing(self, backing: Edge) -> None:
        """Fleecing: the target reads its backing data from the source as
        it was (cbw.PointInTimeView), and keeps its zeroes allocated."""
        view = PointInTimeView(self.graph.new_node_name(None), self.bcs)
        view.child_edges["file"] = self.source.attach(view, Perm.CONSISTENT_READ, Perm.ALL, "file")
        self.view = view
        self.graph.replace_node(self.source, view, edges=[backing])
        self.bcs.zeroes_allocated = True

    async def teardown(self) -> None:
        """Undo setup(): the filter goes, the source's parents move back."""
        if self.filter is not None:
            # writes in flight (and their copies) finish first; new ones wait,
            # then go to the source, where their parents are by then
            self.filter.freeze()
            await self.filter.wait_idle()
        view, self.view = self.view, None
        if view is not None:
            if view.users:
                self.graph.replace_node(view, self.source)
            await self.graph._destroy(view)
        filt, self.filter = self.filter, None
        if self.bitmap is not None:
            self.bitmap.busy = False
        if filt is not None:
            if self.main_edge is not None and self.main_edge in self.edges:
                self.edges.remove(self.main_edge)
                filt.detach(self.main_edge)
        if self.target_edge is not None:
            if filt is not None:
                filt.child_edges.pop("target", None)
            self.target.detach(self.target_edge)
            self.target_edge = None
        if filt is not None:
            filt.dropping = True
            try:
                filt.apply_permissions(*filt.combined_perm())
                await self.graph.drop_filter(filt)
            finally:
                filt.thaw(redirect=self.source)
        await self.let_go_all()  # a target nobody else holds (drive-backup's) goes here

    # --- the filter's side ------------------------------------------------------------------
    async def _copy_before_write(self, offset: int, length: int) -> None:
        try:
            self.current_progress += await self.bcs.copy(offset, length)
        except CopyError as e:
            raise e.exc from None  # the guest's write fails (on-cbw-error=break-guest-write)

    def _written(self, offset: int, length: int, discard: bool) -> None:
        # the successor records what the bitmap would (a discard only where
        # the source marks discards)
        if self.successor is None or not self._successor_records:
            return
        if discard and self.source.options.get("discard") != "unmap":
            return
        self.successor.mark(offset, length)

    # --- the work ------------------------------------------------------------------------------
    async def run(self) -> None:
        if self.sync == "top":
            await self._skip_unallocated()
        if self.sync == "none":
            while not self.is_cancelled():
                await self.sleep(0)  # the filter does the copying
            return
        dirty = self.bcs.dirty
        chunk = max(self.cluster, min(self.max_chunk or MAX_CHUNK, MAX_CHUNK))
        # copies of disjoint runs overlap their I/O in the worker threads; one
        # at a time when an error would stop the job (a pause is taken by one)
        # or under a rate limit (QEMU starts no copy while the limit owes time)
        stops = {"stop", "enospc"} & {self.on_source_error, self.on_target_error}
        copies: dict[asyncio.Task[int], int] = {}  # task -> offset of its run
        cursor = 0
        try:
            while not self.is_cancelled():
                parallel = 1 if stops or self.speed else max(1, min(MAX_IN_FLIGHT, self.max_workers))
                run = dirty.next_run(cursor, chunk) if len(copies) < parallel else None
                if run is not None and any(o == run[0] for o in copies.values()):
                    run = None  # wrapped around to a run in flight: wait for it
                if run is not None:
                    offset, n = run
                    cursor = offset + n
                    copies[asyncio.ensure_future(self.bcs.copy(offset, n))] = offset
                    continue
                if not copies:
                    break
                done, _ = await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    offset = copies.pop(task)
                    try:
                        copied = task.result()
                    except CopyError as e:
                        policy = self.on_source_error if e.is_read else self.on_target_error
                        # report fails the job; stop pauses, ignore goes on: either
                        # way the clusters stay dirty and are tried again (QEMU's backup_loop)
                        await self.io_error(e.exc, is_read=e.is_read, policy=policy)
                        cursor = offset
                        continue
                    await self.processed(copied)
        finally:
            if copies:  # the job ends (cancel, error): its copies finish first
                await asyncio.wait(copies)
        if not self.is_cancelled():
            await self.target.flush()

    async def _skip_unallocated(self) -> None:
        """sync=top: clusters the source's own layer holds nothing of are
        not copied (QEMU's block_copy_reset_unallocated)."""
        base = self.source.child("backing")
        dirty, c, length = self.bcs.dirty, self.cluster, self.bcs.length
        offset = 0
        while offset < length:
            if self.is_cancelled():
                return
            allocated, _zero, n = await allocated_above(self.source, base, offset, length - offset)
            if not allocated:
                # only the clusters the hole covers whole (its ends share theirs with data)
                start = -(-offset // c) * c
                end = length if offset + n >= length else (offset + n) // c * c
                if end > start:
                    dirty.clear(start, end - start)
            offset += n
            await self.pause_point()
        self.total_progress = self.current_progress + dirty.dirty_bytes()

    # --- the end ---------------------------------------------------------------------------------
    def _sync_bitmap(self, success: bool) -> None:
        """QEMU's backup_cleanup_sync_bitmap."""
        bm, successor = self.bitmap, self.successor
        if bm is None or successor is None:
            return
        bm.busy = False
        if self.bitmap_mode == "never" or not (success or self.bitmap_mode == "always"):
            return  # the bitmap as it was plus the successor: what it is now
        bm.bits.restore(successor)
        # QEMU's successor, made when the job was, takes the bitmap's place
        # and name: in the node's list (newest first) it comes after the
        # bitmaps added since and before the older ones
        bitmaps.detach(bm)
        listed = bm.node.dirty_bitmaps
        at = next((i for i, b in enumerate(listed) if id(b) in self._older_bitmaps), len(listed))
        listed.insert(at, bm)
        if not success:  # always, after a failure: also what was not copied
            bm.bits.merge(self.bcs.dirty)

    async def commit(self) -> None:
        self._sync_bitmap(True)

    async def abort(self) -> None:
        self._sync_bitmap(False)

    async def clean(self) -> None:
        await self.teardown()
