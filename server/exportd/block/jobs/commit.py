"""block-commit of an intermediate layer (the active layer's commit is a
mirror: mirror.ActiveCommitJob): the data of the layers from top down to
base is copied into base, then top's overlay takes base as its backing node
(image header first, then the graph) and the committed layers go.

While it runs, the overlay still reads those regions from the layers above
base, so what the guest sees never changes; a crash leaves base with
extra data nobody reads yet."""

from __future__ import annotations

import logging
from typing import Any

from exportd.block.chain import allocated_above, backing_chain
from exportd.block.jobs.base import BlockJob
from exportd.block.node import BlockNode, Perm

log = logging.getLogger(__name__)

CHUNK = 512 << 10  # QEMU's commit buffer


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, daemon: Any, job_id: str, top: BlockNode, base: BlockNode, overlay: BlockNode,
                 backing_file: str | None, **kwargs: Any) -> None:
        super().__init__(daemon, job_id, **kwargs)
        self.top = top
        self.base = base
        self.overlay = overlay
        self.backing_file = backing_file
        self._made_writable = False

    async def setup(self) -> None:
        from exportd.block.reopen import set_read_only

        if self.base.read_only:
            await set_read_only(self.graph, self.base, False)
            self._made_writable = True
        try:
            perm = Perm.WRITE
            if self.base.getlength() < self.top.getlength():
                perm |= Perm.RESIZE
            self.hold(self.base, "base", perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE, backend=True)
            self.hold(self.base, "base", Perm(0), Perm.ALL)  # blocks other operations on it
            for node in backing_chain(self.top, self.base):
                # nobody may change the layers being committed
                self.hold(node, "intermediate node", Perm(0), Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        except BaseException:
            await self.clean()
            raise

    async def run(self) -> None:
        top, base = self.top, self.base
        length = top.getlength()
        if base.getlength() < length:
            await base.truncate(length, exact=False)
        self.total_progress = length
        offset = 0
        while offset < length:
            if self.is_cancelled():
                return
            allocated, zero, n = await allocated_above(top, base, offset, min(CHUNK, length - offset))
            if allocated:
                await self.copy_range(self.top, self.base, offset, n, zero)
                await self.processed(n)
            else:
                self.current_progress += n
                await self.pause_point()
            offset += n

    async def prepare(self) -> None:
        """Base holds everything: the overlay's header names base, then the
        graph follows (the committed layers go with their last user)."""
        await self.base.flush()
        name = self.backing_file if self.backing_file is not None else self.base.filename()
        await self.overlay.set_backing_file(name, self.base.driver)
        await self.graph.set_backing(self.overlay, self.base)

    async def clean(self) -> None:
        await self.let_go_all()
        if self._made_writable:
            from exportd.block.reopen import set_read_only

            self._made_writable = False
            try:
                await set_read_only(self.graph, self.base, True)
            except Exception:
                log.exception("job %s: making %s read-only again failed", self.id, self.base.node_name)
