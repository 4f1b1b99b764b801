"""Write-back of qcow2 metadata in crash-safe order.

Metadata lives in memory as decoded arrays (L1, cached L2 tables, refcount
blocks); guest data goes straight to the file. Metadata changes are kept in
memory (dirty) and written back on flush, on cache pressure and before
structural changes, in this order, with an fsync of the file between steps:

  1. refcount blocks (increments; data written so far becomes durable too)
  2. the refcount table, when it changed
  3. L2 tables
  4. the L1 table, when it changed
  5. only then are refcount decrements (freed clusters) applied in memory

So on-disk refcounts are never lower than the on-disk references (leaks are
possible after a crash, corruption is not), an L2 entry never points at data
that is not on disk, and a freed cluster is reused only after the metadata
that dropped it is durable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exportd.block.qcow2.cluster import OFFSET_MASK
from exportd.block.qcow2.l2cache import encode_table
from exportd.block.qcow2.state import Qcow2State


class Writeback(Qcow2State):
    """The write-back half of Qcow2Node (a mixin: the node's state)."""

    if TYPE_CHECKING:  # compressed_write.py
        def _forget_free_bytes(self, cluster_index: int) -> None: ...

    async def _writeback(self) -> None:
        """Write dirty metadata in crash-safe order (see module docstring). Lock held."""
        io = self.io
        dirty_l2 = self.l2cache.dirty_tables()
        if self.rc.dirty() or dirty_l2 or self.l1_dirty:
            await self.rc.write_blocks()
            if self.rc.table_dirty:
                await io.flush()
                await self.rc.write_table()
            if dirty_l2 or self.l1_dirty:
                await io.flush()
                fixed = self._fixed_metadata()
                for t in dirty_l2:
                    if t.offset >> self.cluster_bits in fixed:
                        raise self.corruption(f"L2 table at 0x{t.offset:x} overlaps other metadata")
                for t in dirty_l2:
                    await io.write(t.offset, encode_table(t.entries))
                    t.dirty = False
                if self.l1_dirty:
                    await io.flush()
                    await io.write(self.header.l1_table_offset, encode_table(self.l1))
                    self.l1_dirty = False
        if self.pending_free:
            await io.flush()
            frees, self.pending_free = self.pending_free, []
            cb = self.cluster_bits
            punch: list[int] = []
            for off, n, want_punch in frees:
                for ci in range(off >> cb, (off >> cb) + n):
                    if await self.rc.add(ci, -1) == 0:
                        self._forget_free_bytes(ci)
                        self.l2cache.drop(ci << cb)
                        self.meta_clusters.discard(ci)
                        if self._last_comp[0] != -1:
                            self._last_comp = (-1, b"")
                        if want_punch:
                            punch.append(ci)
            # unreferenced on disk already: giving the space back is safe
            for ci in sorted(set(punch)):
                try:
                    await io.discard(ci << cb, self.cs)
                except OSError:
                    break  # advisory

    def _fixed_metadata(self) -> set[int]:
        """Clusters of the header, L1, refcount table and blocks (overlap check)."""
        h, cb = self.header, self.cluster_bits
        out = {0}
        out.update(range(h.l1_table_offset >> cb, (h.l1_table_offset + len(self.l1) * 8 + self.cmask) >> cb))
        out.update(range(h.refcount_table_offset >> cb,
                         (h.refcount_table_offset >> cb) + h.refcount_table_clusters))
        out.update((e & OFFSET_MASK) >> cb for e in self.rc.table if e & OFFSET_MASK)
        return out

    async def _relieve_cache(self) -> None:
        if self.l2cache.over_limit():
            await self._writeback()
            self.l2cache.evict_clean()

    async def _durable(self) -> None:
        """Everything in memory on disk: write-back, the decrements it
        applied, fsync. Lock held."""
        await self._writeback()
        await self.rc.write_blocks()  # decrements applied just now
        await self.io.flush()
