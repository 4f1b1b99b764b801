"""Refcount table and blocks: lookups, updates, cluster allocation, table growth.

Crash-safety rules kept here (docs/interop/qcow2.txt; refcounts may be too
high, never too low):
- a new refcount block is written to disk before the table entry pointing to
  it, and the table entry is durable before any L2 entry relies on it (the
  driver's writeback writes blocks, fsyncs, writes the table, fsyncs, then L2);
- a grown refcount table is written and fsynced before the header points to it;
- decrements are applied only after the metadata that dropped the reference is
  durable (the driver queues them and calls `add(..., -1)` after its fsync).

Refcounts sees the image only through what it needs: the image file
(qcow2.imagefile.ImageFile: read, write, flush, its end, the corruption hook),
the set of metadata clusters it must not hand out, a way to queue frees, and
the header update that moves the refcount table.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Awaitable, Callable

from exportd.block.qcow2 import refcount_codec
from exportd.block.qcow2.imagefile import ImageFile
from exportd.block.qcow2.l2cache import encode_table

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
MAX_CACHED_BLOCKS = 512


class RefBlock:
    __slots__ = ("offset", "values", "dirty")

    def __init__(self, offset: int, values: array, dirty: bool = False) -> None:
        self.offset = offset
        self.values = values
        self.dirty = dirty


class Refcounts:
    def __init__(self, io: ImageFile, table: array, order: int, *, cluster_bits: int, table_offset: int,
                 meta_clusters: set[int], defer_free: Callable[[int, int], None],
                 move_table: Callable[[int, int], Awaitable[None]]) -> None:
        """`table`: the decoded refcount table found at `table_offset`;
        `meta_clusters`: the node's metadata clusters (updated here as blocks
        and tables come and go); `defer_free(offset, clusters)`: free after
        the next durable write-back; `move_table(offset, clusters)`: point the
        header at a new table and make that durable."""
        self.io = io
        self.meta = meta_clusters
        self.defer_free = defer_free
        self.move_table = move_table
        self.table_offset = table_offset
        self.cbits = cluster_bits
        self.cs = 1 << self.cbits
        self.bits = 1 << order
        self.max_value = (1 << self.bits) - 1
        self.block_shift = self.cbits + 3 - order  # log2(refcounts per block)
        self.per_block = 1 << self.block_shift
        self.table = table
        self.table_dirty = False
        self.blocks: dict[int, RefBlock] = {}
        self.free_hint = 0

    # --- blocks -----------------------------------------------------------
    async def _block(self, bi: int) -> RefBlock | None:
        b = self.blocks.get(bi)
        if b is not None:
            return b
        if bi >= len(self.table):
            return None
        off = self.table[bi] & REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cs - 1) or off + self.cs > self.io.end:
            raise self.io.corruption(f"refcount block {bi} at 0x{off:x} is outside the image or misaligned")
        data = await self.io.read(off, self.cs)
        b = RefBlock(off, refcount_codec.decode(data, self.bits))
        if len(self.blocks) >= MAX_CACHED_BLOCKS:
            for k in [k for k, v in self.blocks.items() if not v.dirty][: MAX_CACHED_BLOCKS // 4]:
                del self.blocks[k]
        self.blocks[bi] = b
        return b

    async def get(self, ci: int) -> int:
        b = await self._block(ci >> self.block_shift)
        return b.values[ci & (self.per_block - 1)] if b is not None else 0

    async def add(self, ci: int, delta: int) -> int:
        """Change one cluster's refcount (its block must exist for increments)."""
        b = await self._block(ci >> self.block_shift)
        if b is None:
            if delta < 0:
                return 0  # already zero: image was inconsistent; never go below 0
            b = await self._create_block(ci >> self.block_shift, ci)
        i = ci & (self.per_block - 1)
        v = b.values[i] + delta
        if v < 0:
            v = 0
        if v > self.max_value:
            raise OSError(errno.EMFILE, "qcow2: refcount overflow")
        b.values[i] = v
        b.dirty = True
        if v == 0:
            self.free_hint = min(self.free_hint, ci)
        return v

    async def _create_block(self, bi: int, at: int) -> RefBlock:
        """A new block for range `bi`, placed at free cluster `at` of that range
        (so it counts itself). Written now; its table entry is written at writeback."""
        if bi >= len(self.table):
            await self._grow_table(at)
            b = self.blocks.get(bi)
            assert b is not None
            return b
        assert at >> self.block_shift == bi
        values = refcount_codec.decode(bytes(self.cs), self.bits)
        values[at & (self.per_block - 1)] = 1
        off = at << self.cbits
        b = RefBlock(off, values)
        await self.io.write(off, refcount_codec.encode(values, self.bits))
        self.blocks[bi] = b
        self.table[bi] = off
        self.table_dirty = True
        self.meta.add(at)
        return b

    async def _grow_table(self, start: int) -> None:
        """Move the refcount table to a bigger one at cluster `start` (which lies
        beyond everything the old table covers, so every cluster from there on is
        free), followed by the new blocks that cover the table and themselves."""
        old_slots = len(self.table)
        t_clusters = 1
        n_blocks = 0
        while True:
            last = start + t_clusters + n_blocks - 1
            need_slots = (last >> self.block_shift) + 1
            want_slots = max(need_slots, old_slots * 2, 1)
            t_new = -(-want_slots * 8 // self.cs)
            b_new = need_slots - old_slots
            if t_new == t_clusters and b_new == n_blocks:
                break
            t_clusters, n_blocks = max(t_clusters, t_new), max(n_blocks, b_new)
        if t_clusters * self.cs > 8 * 1024 * 1024:
            raise OSError(errno.EFBIG, "qcow2: refcount table would exceed 8 MiB")
        table = array("Q", self.table)
        table.extend([0] * (t_clusters * self.cs // 8 - len(table)))
        used_end = start + t_clusters + n_blocks
        new_blocks: dict[int, RefBlock] = {}
        for k in range(n_blocks):
            bi = old_slots + k
            ci = start + t_clusters + k
            values = refcount_codec.decode(bytes(self.cs), self.bits)
            lo, hi = bi << self.block_shift, (bi + 1) << self.block_shift
            for c in range(max(lo, start), min(hi, used_end)):
                values[c - lo] = 1
            b = RefBlock(ci << self.cbits, values)
            new_blocks[bi] = b
            table[bi] = b.offset
            await self.io.write(b.offset, refcount_codec.encode(values, self.bits))
        tbl_off = start << self.cbits
        await self.io.write(tbl_off, encode_table(table))
        await self.io.flush()
        old_off, old_clusters = self.table_offset, len(self.table) * 8 >> self.cbits
        await self.move_table(tbl_off, t_clusters)
        self.table_offset = tbl_off
        self.table = table
        self.table_dirty = False
        self.blocks.update(new_blocks)
        for c in range(start, used_end):
            self.meta.add(c)
        old_ci = old_off >> self.cbits
        for c in range(old_ci, old_ci + old_clusters):
            self.meta.discard(c)
            self.defer_free(c << self.cbits, 1)

    # --- allocation ---------------------------------------------------------
    async def _next_free(self, ci: int) -> int:
        """The first cluster index >= ci with refcount 0 (searched at C speed)."""
        mask = self.per_block - 1
        while True:
            bi = ci >> self.block_shift
            b = await self._block(bi)
            if b is None:
                return ci
            try:
                return (bi << self.block_shift) + b.values.index(0, ci & mask)
            except ValueError:
                ci = (bi + 1) << self.block_shift

    async def alloc(self, n: int = 1) -> int:
        """Allocate `n` contiguous free clusters (refcount 1 each); returns the
        host offset of the first."""
        ci = self.free_hint
        meta = self.meta
        while True:
            ci = await self._next_free(ci)
            run_ok = True
            for j in range(n):
                c = ci + j
                if c in meta or (j and await self.get(c)):
                    ci = c + 1
                    run_ok = False
                    break
            if not run_ok:
                continue
            # every cluster of the run needs an existing refcount block
            restarted = False
            for j in range(n):
                c = ci + j
                if await self._block(c >> self.block_shift) is None:
                    await self._create_block(c >> self.block_shift, c)
                    restarted = True
                    break
            if restarted:
                continue  # the new block took a cluster; search again
            for j in range(n):
                await self.add(ci + j, 1)
            self.free_hint = ci + n
            return ci << self.cbits

    # --- writeback ------------------------------------------------------------
    def dirty(self) -> bool:
        return self.table_dirty or any(b.dirty for b in self.blocks.values())

    async def write_blocks(self) -> bool:
        wrote = False
        for b in self.blocks.values():
            if b.dirty:
                await self.io.write(b.offset, refcount_codec.encode(b.values, self.bits))
                b.dirty = False
                wrote = True
        return wrote

    async def write_table(self) -> None:
        if self.table_dirty:
            await self.io.write(self.table_offset, encode_table(self.table))
            self.table_dirty = False
