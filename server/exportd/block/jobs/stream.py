"""block-stream: the data of the backing layers above base is copied into
top where top has none of its own, then top takes base as its backing node
(image header first, then the graph) and the streamed layers go.

A copy-on-read filter above top orders the guest's writes with the job's:
a chunk being copied is locked, so a guest write to it waits, and the copy
never overwrites newer data. Reads see the same bytes before and after a
chunk is copied; a crash leaves top with extra copies of backing data."""

from __future__ import annotations

import logging
from typing import Any

from exportd.block.chain import allocated_above, backing_chain
from exportd.block.jobs.base import BlockJob
from exportd.block.jobs.filter import JobFilter
from exportd.block.node import BlockNode, Perm, Status

log = logging.getLogger(__name__)

CHUNK = 512 << 10  # QEMU's stream chunk


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, daemon: Any, job_id: str, top: BlockNode, base: BlockNode | None,
                 backing_file: str | None, **kwargs: Any) -> None:
        super().__init__(daemon, job_id, **kwargs)
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.filter: JobFilter | None = None
        self._made_writable = False

    async def setup(self, filter_node_name: str | None) -> None:
        from exportd.block.reopen import set_read_only

        if self.top.read_only:
            await set_read_only(self.graph, self.top, False)
            self._made_writable = True
        try:
            filt = JobFilter(self.graph.new_node_name(filter_node_name), "copy-on-read", "file", self)
            self.main_edge = self.hold_filter(filt, backend=True)
            try:
                self.graph.insert_filter(self.top, filt, "file")
            except BaseException:
                filt.detach(self.main_edge)
                raise
            self.filter = filt
            filt.serialize_writes = True
            # the job's own edges block other operations on its nodes (QEMU's op blockers)
            self.hold(filt, "main node", Perm(0), Perm.ALL)
            self.hold(self.top, "active node", Perm(0), Perm.ALL)
            backing = self.top.child("backing")
            if backing is not None:
                for node in backing_chain(backing, self.base):
                    self.hold(node, "intermediate node", Perm(0), Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        except BaseException:
            await self.clean()
            raise

    async def run(self) -> None:
        assert self.filter is not None
        top, locks = self.top, self.filter.locks
        length = top.getlength()
        self.total_progress = length
        backing = top.child("backing")
        offset = 0
        while backing is not None and offset < length:
            if self.is_cancelled():
                return
            n = min(CHUNK, length - offset)
            copied = False
            token = await locks.acquire(offset, n)
            try:
                st = await top.block_status(offset, n)
                n = max(1, min(n, st.length))
                if not st.status & Status.ALLOCATED:
                    allocated, zero, n = await allocated_above(backing, self.base, offset, n)
                    if allocated:
                        await self.copy_range(self.top, self.top, offset, n, zero, as_read=True)
                        copied = True
            finally:
                locks.release(token)
            offset += n
            if copied:
                await self.processed(n)
            else:
                self.current_progress += n
                await self.pause_point()
        self.current_progress = self.total_progress

    async def prepare(self) -> None:
        top, base = self.top, self.base
        if top.child("backing") is None:
            return  # nothing was below top
        await top.flush()
        if base is None:
            await top.set_backing_file(None, None)
        else:
            name = self.backing_file if self.backing_file is not None else base.filename()
            await top.set_backing_file(name, base.driver)
        await self.graph.set_backing(top, base)

    async def clean(self) -> None:
        await self.let_go_all()
        if self.filter is not None:
            filt, self.filter = self.filter, None
            filt.detach(self.main_edge)
            await self.graph.drop_filter(filt)
        if self._made_writable:
            from exportd.block.reopen import set_read_only

            self._made_writable = False
            try:
                await set_read_only(self.graph, self.top, True)
            except Exception:
                log.exception("job %s: making %s read-only again failed", self.id, self.top.node_name)
