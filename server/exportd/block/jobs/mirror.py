"""The mirror job (blockdev-mirror, drive-mirror) and active commit, which
is a mirror of the active layer into a node of its own backing chain.

A filter above the source sees every write (filter.py). The job copies the
dirty chunks (at first: everything, or what the top layer or the layers
above the commit base hold) to the target; once nothing is dirty it is
READY and keeps copying what new writes dirty. job-complete then freezes
the writes, copies the last dirty chunks, and moves every parent of the
filter onto the target (graph.replace_node), all in one step of the loop;
the writes that waited go to the target. A soft cancel once READY does
the same without the move: the source stays, the target holds a
consistent copy.

In write-blocking mode a write to the source is also written to the
target before it completes, so the job converges whatever the write rate.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from exportd.block.chain import allocated_above
from exportd.block.dirtymap import DirtyMap
from exportd.block.graph import can_replace, is_zero
from exportd.block.jobs.base import BlockJob
from exportd.block.jobs.filter import JobFilter
from exportd.block.node import BlockNode, Perm, Status
from exportd.errors import BlockError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

MAX_CHUNK = 256 << 10  # bytes copied per step (at most buf-size): the loop is held for one step
MAX_IN_FLIGHT = 4  # steps in flight (their I/O overlaps in the worker threads)
ZEROING_STEP = 1 << 30  # bytes zeroed per step when a target is zeroed before the copy


class MirrorJob(BlockJob):
    job_type = "mirror"
    can_complete = True

    def __init__(self, daemon: Any, job_id: str, source: BlockNode, target: BlockNode, *, sync: str = "full",
                 granularity: int = 0, buf_size: int = 16 << 20, copy_mode: str = "background",
                 base: BlockNode | None = None, replaces: BlockNode | None = None,
                 on_source_error: str = "report", on_target_error: str = "report",
                 target_backing: BlockNode | None = None, zero_target: bool = True, unmap: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(daemon, job_id, **kwargs)
        self.source = source
        self.target = target
        self.sync = sync
        self.granularity = granularity or default_granularity(target)
        self.buf_size = buf_size
        self.copy_mode = copy_mode
        self.base = base  # active commit: the node committed into (the target)
        self.to_replace = replaces or source
        # QEMU keeps the name and looks the node up again at job-complete
        self.replaces = replaces.node_name if replaces is not None else None
        # drive-mirror's `unmap`: zeroes of the source become holes in the
        # target (or written zeroes when False); blockdev-mirror always unmaps
        self.unmap = unmap
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.target_backing = target_backing  # drive-mirror: the target's backing after the pivot
        # sync=full copies everything unless the target is known to read
        # zeroes (an image drive-mirror just made): then what is allocated
        self.zero_target = zero_target
        self.filter: JobFilter | None = None
        self.dirty: DirtyMap | None = None
        self.should_complete = False
        self.pivoted = False
        self._made_base_writable = False

    # --- set-up (inside the command: a failure changes nothing) ----------------------------
    async def setup(self, filter_node_name: str | None, filter_driver: str = "mirror_top") -> None:
        graph = self.graph
        target_in_chain = self.base is not None
        if target_in_chain and self.target.read_only:
            from exportd.block.reopen import set_read_only

            await set_read_only(graph, self.target, False)
            self._made_base_writable = True
        try:
            filt = JobFilter(graph.new_node_name(filter_node_name), filter_driver, "backing", self)
            self.main_edge = self.hold_filter(filt)
            try:
                graph.insert_filter(self.source, filt, "backing")
            except BaseException:
                filt.detach(self.main_edge)
                raise
            self.filter = filt
            perm = Perm.WRITE
            shared = Perm.WRITE_UNCHANGED
            if target_in_chain:
                if self.target.getlength() < self.source.getlength():
                    perm |= Perm.RESIZE
                shared |= Perm.CONSISTENT_READ | Perm.WRITE
            self.target_edge = self.hold(self.target, "target", perm, shared, backend=True)
            # the job's own edges block other operations on its nodes (QEMU's op blockers)
            self.hold(self.target, "target", Perm(0), Perm.ALL)
            self.hold(self.source, "source", Perm(0), Perm.ALL)
        except BaseException:
            await self._undo_setup()
            raise
        # from here on every write through the filter is tracked, also those
        # that come before run() starts (a sync=none mirror copies only them)
        self.dirty = DirtyMap(self.source.getlength(), self.granularity)
        self.filter.written = self._written
        self.filter.serialize_writes = self.copy_mode == "write-blocking"

    async def _undo_setup(self) -> None:
        await self.let_go_all()
        if self.filter is not None:
            self.filter.detach(self.main_edge)
            await self.graph.drop_filter(self.filter)
            self.filter = None
        if self._made_base_writable:
            from exportd.block.reopen import set_read_only

            self._made_base_writable = False
            try:
                await set_read_only(self.graph, self.target, True)
            except Exception:
                log.exception("job %s: making %s read-only again failed", self.id, self.target.node_name)

    # --- writes through the filter ------------------------------------------------------
    async def _written(self, offset: int, length: int, data: Any) -> None:
        dirty = self.dirty
        if dirty is None or self.pivoted:
            return
        if self.copy_mode == "write-blocking" and not self.should_stop() and data is not None:
            try:
                await self.target.write(offset, data)
                return  # the target has it: the chunk stays as clean or dirty as it was
            except OSError:
                log.warning("job %s: write-blocking copy failed; left for the background copy", self.id)
        self.total_progress += dirty.mark(offset, length)
        self.enter()

    # --- the work ---------------------------------------------------------------------------
    async def run(self) -> None:
        assert self.filter is not None
        source, target = self.source, self.target
        length = source.getlength()
        target_length = target.getlength()
        if self.base is not None:
            if length > target_length:
                await target.truncate(length, exact=False)
        elif length != target_length:
            raise BlockError("Source and target image have different sizes")
        dirty = self.dirty
        assert dirty is not None
        await self._initial_dirty(length)
        self.total_progress = dirty.dirty_bytes()
        chunk = max(self.granularity, min(self.buf_size, MAX_CHUNK))
        # copies in flight at once (one when an error would stop the job:
        # a pause is taken by one copy at a time)
        stops = {"stop", "enospc"} & {self.on_source_error, self.on_target_error}
        parallel = 1 if stops else max(1, min(MAX_IN_FLIGHT, self.buf_size // chunk))
        copies: set[asyncio.Task[int]] = set()
        cursor = 0
        try:
            while True:
                if self.is_cancelled():
                    return
                run = dirty.next_run(cursor, chunk) if len(copies) < parallel else None
                if run is not None:
                    offset, n = run
                    cursor = offset + n
                    dirty.clear(offset, n)  # now, not when the task first runs
                    copies.add(asyncio.ensure_future(self._copy(offset, n)))
                    continue
                if copies:
                    done, copies = await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
                    errors = [e for e in (t.exception() for t in done) if e is not None]
                    if errors:
                        raise errors[0]  # a copy's error fails the job
                    await self.processed(sum(t.result() for t in done))
                    continue
                if await self._idle_step():
                    return
        finally:
            if copies:  # the job ends (cancel, error): its copies finish first
                await asyncio.wait(copies)

    async def _idle_step(self) -> bool:
        """Nothing dirty and nothing in flight: READY, the final copy, or a
        wait for the next write or verb. True when run() is done."""
        dirty, target = self.dirty, self.target
        assert dirty is not None
        if not self.is_ready():
            await target.flush()
            if dirty.count or self.is_cancelled():
                return False
            self.set_ready()
        if self.should_complete or self.should_stop():
            return await self._converged()
        await self.sleep(0)  # until a write dirties something, or a verb
        return False

    async def _converged(self) -> bool:
        """Freeze new writes, let the ones in flight finish, copy what they
        dirtied while nothing new can come (QEMU's drained final copy); True
        when the target is then in sync, with the writes still frozen until
        the pivot (or a cancel) lets them go."""
        assert self.filter is not None and self.dirty is not None
        self.filter.freeze()
        try:
            await self.filter.wait_idle()
            while self.dirty.count and not self.is_cancelled():
                offset, n = self.dirty.next_run(0, MAX_CHUNK)  # type: ignore[misc]
                self.dirty.clear(offset, n)
                self.current_progress += await self._copy(offset, n)
            if self.is_cancelled():
                self.filter.thaw()
                return False
            await self.target.flush()
        except BaseException:
            self.filter.thaw()
            raise
        return True

    async def _initial_dirty(self, length: int) -> None:
        """What the first pass copies: QEMU's mirror_dirty_init."""
        assert self.dirty is not None
        if self.sync == "none":
            return
        if self.sync == "full" and self.base is None and self.zero_target:
            if not can_write_zeroes_with_unmap(self.target):
                self.dirty.mark(0, length)
                return
            # a target that can punch holes is zeroed first (with `unmap`:
            # holes, else written zeroes), not counted as progress, and then
            # gets only what the chain holds, as onto a new image
            for offset in range(0, length, ZEROING_STEP):
                if self.is_cancelled():
                    return
                await self.target.write_zeroes(offset, min(ZEROING_STEP, length - offset), may_unmap=self.unmap)
                await self.pause_point()
        # sync=top: what the source's own layer holds; active commit: the
        # layers above base; full onto zeroes: what the whole chain holds
        if self.base is not None or self.sync == "full":
            base = self.base
        else:
            base = self.source.child("backing")
        offset = 0
        while offset < length:
            allocated, _zero, n = await allocated_above(self.source, base, offset, length - offset)
            if allocated:
                self.dirty.mark(offset, n)
            offset += n
            await self.pause_point()

    async def _copy(self, offset: int, n: int) -> int:
        """Copy one dirty run, already cleared in the dirty map, to the
        target (zeroes as zeroes); returns the bytes it accounts for (the
        caller records the progress)."""
        assert self.filter is not None
        token = await self.filter.locks.acquire(offset, n) if self.filter.serialize_writes else None
        try:
            while True:
                try:
                    data = await self.source.read(offset, n)
                    break
                except OSError as e:
                    if not await self.io_error(e, is_read=True, policy=self.on_source_error):
                        return n
            for start, length, piece in self._pieces(offset, data):
                while True:
                    try:
                        if piece is not None:
                            await self.target.write(start, piece)
                        elif not await self._target_reads_zeroes(start, length):
                            await self.target.write_zeroes(start, length, may_unmap=self.unmap)
                        break
                    except OSError as e:
                        if not await self.io_error(e, is_read=False, policy=self.on_target_error):
                            break
        finally:
            if token is not None:
                self.filter.locks.release(token)
        return n

    def _pieces(self, offset: int, data: Buffer) -> list[tuple[int, int, Buffer | None]]:
        """The run read at `offset` cut into data and zeroes (piece None) at
        the job's granularity, so that zero clusters amid data stay zero
        clusters in the target (QEMU writes what the source's block status
        calls zero as zeroes). The bytes tell, which is cheaper than asking
        the source's block status (it may have to search the host file)."""
        if is_zero(data):
            return [(offset, len(data), None)]
        view = memoryview(data)
        pieces: list[tuple[int, int, Buffer | None]] = []
        g = self.granularity
        for at in range(0, len(view), g):
            chunk = view[at:at + g]
            # the end bytes first: data is told without a copy of the granule
            zero = chunk[0] == 0 and chunk[-1] == 0 and is_zero(chunk)
            if pieces and (pieces[-1][2] is None) == zero:
                start, length, _ = pieces[-1]
                pieces[-1] = (start, length + len(chunk), None if zero else view[start - offset:at + len(chunk)])
            else:
                pieces.append((offset + at, len(chunk), None if zero else chunk))
        if len(pieces) == 1:
            return [(offset, len(data), data)]  # all data: the buffer as read
        return pieces

    async def _target_reads_zeroes(self, offset: int, n: int) -> bool:
        tst = await self.target.block_status(offset, n)
        return bool(tst.status & Status.ZERO) and tst.length >= n

    # --- verbs ------------------------------------------------------------------------------
    def do_complete(self) -> None:
        if self.replaces is not None:
            node = self.graph.find(self.replaces)
            if node is None:
                raise BlockError(f"Node name '{self.replaces}' not found")
            self.to_replace = node
        self.should_complete = True

    def do_cancel(self, force: bool) -> bool:
        return force or not self.is_ready()  # before READY every cancel is forced

    # --- finalization -------------------------------------------------------------------------
    async def prepare(self) -> None:
        """The pivot (only after job-complete): every parent of the filter
        moves onto the target, in one step, then the frozen writes go there."""
        assert self.filter is not None
        if not self.should_complete or self.cancelled:
            return
        graph = self.graph
        # the job's own holds must not stand in the way, nor move
        self.target.update(self.target_edge, Perm(0), Perm.ALL)
        self.filter.detach(self.main_edge)
        try:
            # drive-mirror's new image gets its backing node before anyone
            # writes to it (a partial cluster copies from the backing node)
            if self.target_backing is not None and self.target.child("backing") is None:
                await graph.set_backing(self.target, self.target_backing)
            if self.to_replace is not self.source:
                # the graph may have changed since the start: QEMU checks
                # again, reports why on stderr and fails the job with EPERM
                if not can_replace(self.source, self.to_replace):
                    log.error("job %s: Can no longer replace '%s' by '%s', because it can no longer be guaranteed "
                              "that doing so would not lead to an abrupt change of visible data",
                              self.id, self.to_replace.node_name, self.target.node_name)
                    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
                graph.replace_node(self.to_replace, self.target)
            else:
                graph.replace_node(self.filter, self.target)
        except BaseException:
            self.filter.thaw()
            raise
        self.pivoted = True
        self.filter.thaw(redirect=self.target)

    async def clean(self) -> None:
        if self.filter is not None:
            if self.main_edge in self.filter.users:
                self.filter.detach(self.main_edge)
            self.filter.thaw()
            filt, self.filter = self.filter, None
            await self.graph.drop_filter(filt)
        await self.let_go_all()
        if self._made_base_writable and not self.pivoted:
            from exportd.block.reopen import set_read_only

            try:
                await set_read_only(self.graph, self.target, True)
            except Exception:
                log.exception("job %s: making %s read-only again failed", self.id, self.target.node_name)


class ActiveCommitJob(MirrorJob):
    """block-commit of the active layer: a mirror into its own base."""

    job_type = "commit"


def default_granularity(target: BlockNode) -> int:
    """The target's cluster size, 4 KiB to 64 KiB (QEMU's default)."""
    return min(max(target.cluster_size(), 4096), 65536)


def check_granularity(granularity: int) -> None:
    if granularity and not 512 <= granularity <= 64 << 20:
        raise BlockError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise BlockError("Parameter 'granularity' expects a power of 2")


def can_write_zeroes_with_unmap(node: BlockNode) -> bool:
    """QEMU's bdrv_can_write_zeroes_with_unmap: opened with discard=unmap,
    on a driver whose zero writes can leave holes (qcow2 from version 3,
    raw and file)."""
    if node.options.get("discard") != "unmap":
        return False
    if node.driver == "qcow2":
        return getattr(node, "version", 3) >= 3
    return node.driver in ("raw", "file")
