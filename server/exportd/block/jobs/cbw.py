"""Copy-before-write: what makes a backup a point-in-time copy of a node
that keeps being written (QEMU's block/copy-before-write.c and
block/block-copy.c).

`BlockCopy` is the copy state a backup job and its filter share: one
dirty flag per cluster that still has to reach the target, and range
locks. Whoever copies a cluster (the job's background pass, or the filter
before a write lands) holds the cluster's range, copies what is still
dirty and clears it, so each cluster is copied exactly once, with the
data it had when the job started.

`CopyBeforeWriteFilter` is the job's filter above the source (driver
"copy-before-write", the source as its "file" child): before a write,
write-zeroes or discard passes, the clusters it touches that were not
copied yet are copied to the target. If that copy fails, the write fails
(QEMU's on-cbw-error=break-guest-write, its default).
"""

from __future__ import annotations

import contextvars
import errno
from collections.abc import Callable
from typing import Any

from exportd.block.dirtymap import DirtyMap
from exportd.block.graph import is_zero
from exportd.block.jobs.filter import JobFilter, RangeLocks
from exportd.block.node import BlockNode, BlockStatus, Perm, Status
from exportd.extents import Extent

MAX_CHUNK = 1 << 20  # QEMU's block-copy buffer (BLOCK_COPY_MAX_BUFFER): bytes per copy step
MAX_IN_FLIGHT = 4  # a job's background copies at once (QEMU's x-perf max-workers caps it)
DEFAULT_CLUSTER = 64 << 10  # BLOCK_COPY_CLUSTER_SIZE_DEFAULT


def supports_compressed_writes(target: BlockNode) -> bool:
    """QEMU's bdrv_supports_compressed_writes: the target's driver writes
    compressed clusters (exportd: qcow2; no filter forwards them)."""
    return callable(getattr(target, "write_compressed", None))


def cluster_size(target: BlockNode) -> int:
    """QEMU's block_copy_calculate_cluster_size: the target's cluster size,
    64 KiB at least (also when the target has none)."""
    return max(DEFAULT_CLUSTER, target.cluster_size())


class CopyError(Exception):
    """A copy step failed: on the source (`is_read`) or on the target."""

    def __init__(self, exc: OSError, *, is_read: bool) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.is_read = is_read


class BlockCopy:
    """Which clusters of `source` still have to reach `target`, and who is
    copying which right now."""

    def __init__(self, source: BlockNode, target: BlockNode, cluster: int, *, compress: bool = False) -> None:
        self.source = source
        self.target = target
        self.cluster = cluster
        # data clusters go to the target compressed (QEMU's write flag
        # BDRV_REQ_WRITE_COMPRESSED; zeroes stay zero writes): whole target
        # clusters, so a step is never less than a copy cluster
        self.compress = compress
        self.step = max(MAX_CHUNK, cluster) if compress else MAX_CHUNK
        self.length = source.getlength()
        self.dirty = DirtyMap(self.length, cluster)  # clusters still to copy
        self.locks = RangeLocks()
        # the target is a layer that will sit on other images (an incremental
        # backup): its zeroes must be allocated there, not read through
        self.zeroes_allocated = False

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        c = self.cluster
        start = offset // c * c
        return start, min(self.length, -(-(offset + length) // c) * c) - start

    async def copy(self, offset: int, length: int) -> int:
        """Copy the clusters [offset, offset + length) touches that are
        still dirty, holding their range; returns the bytes copied. A
        failed step leaves its clusters dirty and raises CopyError."""
        start, n = self._aligned(offset, length)
        if n <= 0 or not self.dirty.count:
            return 0
        token = await self.locks.acquire(start, n)
        try:
            done = 0
            for run, run_n, dirty in list(self.dirty.runs(start, n)):
                pos, end = run, run + run_n
                while dirty and pos < end:
                    step = min(self.step, end - pos)
                    await self._copy_step(pos, step)
                    self.dirty.clear(pos, step)
                    done += step
                    pos += step
            return done
        finally:
            self.locks.release(token)

    async def _copy_step(self, offset: int, n: int) -> None:
        try:
            data = await self.source.read(offset, n)
        except OSError as e:
            raise CopyError(e, is_read=True) from e
        try:
            if self.compress:
                await self._write_compressed(offset, data)
            elif is_zero(data):
                await self._write_zeroes(offset, n)
            else:
                await self.target.write(offset, data)
        except OSError as e:
            raise CopyError(e, is_read=False) from e

    async def _write_zeroes(self, offset: int, n: int) -> None:
        # never unmapped (as QEMU's block-copy): a cluster copied to an
        # incremental or fleecing target must not read through to its
        # backing image
        await self.target.write_zeroes(offset, n)
        if self.zeroes_allocated and not await self._allocated(offset, n):
            # a driver that leaves zeroes unallocated where nothing
            # lies below (exportd's qcow2 without a backing file)
            await self.target.write(offset, bytes(n))

    async def _write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Runs of target clusters: zeroes as zero writes, data compressed
        (the target's driver writes a cluster that does not shrink plain)."""
        tcs = self.target.cluster_size()
        mv = memoryview(data).cast("B")
        pos, end = 0, len(mv)
        while pos < end:
            zero = is_zero(mv[pos : pos + tcs])
            run_end = pos + tcs
            while run_end < end and is_zero(mv[run_end : run_end + tcs]) == zero:
                run_end += tcs
            run_end = min(run_end, end)
            if zero:
                await self._write_zeroes(offset + pos, run_end - pos)
            else:
                await self.target.write_compressed(offset + pos, mv[pos:run_end])  # type: ignore[attr-defined]
            pos = run_end

    async def _allocated(self, offset: int, n: int) -> bool:
        end = offset + n
        while offset < end:
            st = await self.target.block_status(offset, end - offset)
            if not st.status & Status.ALLOCATED or st.length <= 0:
                return False
            offset += st.length
        return True


class CopyBeforeWriteFilter(JobFilter):
    """The backup job's filter node. The job sets `before_write` (its copy
    of the clusters a write touches) and `after_write`, which hears of every
    write after it landed, with whether it was a discard."""

    def __init__(self, node_name: str, owner: Any, bcs: BlockCopy) -> None:
        super().__init__(node_name, "copy-before-write", "file", owner)
        self.bcs = bcs
        self.dropping = False
        self.after_write: Callable[[int, int, bool], None] | None = None

    def apply_permissions(self, perm: Perm, shared: Perm) -> None:
        # QEMU's cbw_child_perm: reading the old data needs consistent
        # reads once parents write, and nobody may write or resize the
        # source behind the filter's back
        edge = self.child_edges.get(self.role)
        if edge is not None and self.dropping:
            edge.node.update(edge, Perm(0), Perm.ALL)  # its parents are about to move back onto the source
        elif edge is not None:
            if perm & Perm.WRITE:
                perm |= Perm.CONSISTENT_READ
            edge.node.update(edge, perm, (shared | Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
                             & ~(Perm.WRITE | Perm.RESIZE))

    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        return super().map_now(offset, length, write=write)  # reads keep the source's fast path

    def _heard(self, offset: int, length: int, discard: bool) -> None:
        if self.after_write is not None:
            self.after_write(offset, length, discard)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        try:
            await super().write(offset, data, fua=fua)
        finally:
            self._heard(offset, len(data), False)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        try:
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
        finally:
            self._heard(offset, length, False)

    async def discard(self, offset: int, length: int) -> None:
        try:
            await super().discard(offset, length)
        finally:
            self._heard(offset, length, True)

    def host_fd(self) -> int | str:
        return f"a backup job copies before writes ({self.owner.describe()})"


# set while a view reads the target for one task: a read that comes back
# through the target's backing edge would be a loop
_reading_target: contextvars.ContextVar[bool] = contextvars.ContextVar("reading_target", default=False)


class PointInTimeView(BlockNode):
    """The source as it was when the backup started, for a target whose
    backing node is the source (fleecing): the target's backing edge points
    here while the job runs (QEMU's snapshot-access idea). A cluster still
    to copy is read from the source under its range lock (a write there
    waits for the read, then copies it first); a copied one from the target,
    which holds the old data by then. Without it a reader of the target
    that found a cluster unallocated could read the source just after a
    write changed it."""

    driver = "snapshot-access"

    def __init__(self, node_name: str, bcs: BlockCopy) -> None:
        super().__init__(node_name, read_only=True)
        self.bcs = bcs

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> BlockNode:
        raise NotImplementedError("a point-in-time view is only created by a backup job")

    def getlength(self) -> int:
        return self.bcs.length

    def filtered_node(self) -> BlockNode | None:
        return self.bcs.source  # its data, as of the job's start

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        bcs = self.bcs
        end = min(offset + length, bcs.length)
        if end <= offset:
            return bytes(length)
        start, n = bcs._aligned(offset, end - offset)
        token = await bcs.locks.acquire(start, n)
        try:
            out = bytearray(length)
            for pos, run, dirty in list(bcs.dirty.runs(offset, end - offset)):
                if dirty:
                    data = await bcs.source.read(pos, run)
                else:
                    if _reading_target.get():
                        raise OSError(errno.EIO, "backup target reads its own backing data back")
                    reset = _reading_target.set(True)
                    try:
                        data = await bcs.target.read(pos, run)
                    finally:
                        _reading_target.reset(reset)
                out[pos - offset : pos - offset + run] = data
            return out
        finally:
            bcs.locks.release(token)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "a point-in-time view is read-only")

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.bcs.source.block_status(offset, length)

    def filename(self) -> str:
        return self.bcs.source.filename()
