"""Cluster mapping and allocation (QEMU's qcow2-cluster.c): where a guest
range lives, and the metadata changes that give clusters to guest data.

`_map_cached` is the one mapping function: it walks L1 and the cached L2
tables and describes a guest range as runs [kind, guest offset, length,
host offset or L2 entry]. Every user goes through it: the synchronous data
path (map_now), read(), write() (ranges whose clusters are ours alone),
block_status, resize. `_map` drives it across L2 tables that must be loaded.

Allocation (`_write_alloc`, `_set_clusters`, `_l2_for_write`) runs with the
node's lock held and changes metadata in memory only; writeback.py writes it
back in crash-safe order.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

from exportd.block.qcow2.compress import decompress
from exportd.block.qcow2.l2cache import L2Table, decode_table
from exportd.block.qcow2.state import Qcow2State

if TYPE_CHECKING:
    from exportd.block.node import BlockNode

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9..55 of L1/L2 entries
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L2_RESERVED = 0x1FE  # bits 1..8 of a standard descriptor
NOT_STANDARD = COMPRESSED | ZERO | L2_RESERVED  # an entry with none of these is data or unallocated

# run kinds
K_UNALLOC, K_ZERO, K_DATA, K_COMP, K_BAD = 0, 1, 2, 3, 4
STOP = -1  # _map_cached: the walk ended before the range did (see there)


class ClusterMap(Qcow2State):
    """The mapping and allocation half of Qcow2Node (a mixin: the node's state)."""

    version: int
    l2_mask: int
    l1_shift: int
    comp_shift: int
    comp_off_mask: int
    comp_sec_mask: int
    _pass_discard: bool

    if TYPE_CHECKING:  # defined by the node
        @property
        def backing(self) -> BlockNode | None: ...

    # ------------------------------------------------------------- mapping
    def _map_cached(self, pos: int, end: int, out: list[list[int]], owned_only: bool,
                    pinned: L2Table | None = None) -> int:
        """Append the runs of guest range [pos, end) to `out`, merging
        neighbours of one kind (data runs when their host bytes follow on),
        as far as the L2 tables are cached (or `pinned`, a table just loaded).

        Returns `end` when done; the guest offset where an L2 table must be
        loaded first; or STOP: with `owned_only` (a write in place) at the first
        cluster that is not standard data ours alone (COPIED in L1 and L2,
        inside the file, not metadata), and otherwise after appending a
        [K_BAD, guest, length, entry] run for an invalid L2 entry. Never does
        I/O and never reports corruption itself (map_now must not)."""
        cbits, cmask, l2_mask, l1, l1_shift = self.cluster_bits, self.cmask, self.l2_mask, self.l1, self.l1_shift
        lookup = self.l2cache.lookup
        if not (pos ^ (end - 1)) >> cbits and not out and pos < end:
            # the common request: data inside one cluster (the walk below would
            # say the same, at twice the cost)
            l1e = l1[pos >> l1_shift] if pos >> l1_shift < len(l1) else 0
            t = lookup(l1e & OFFSET_MASK) if l1e & OFFSET_MASK else None
            if t is not None:
                e = t.entries[(pos >> cbits) & l2_mask]
                h = e & OFFSET_MASK
                if h and not e & NOT_STANDARD and not h & cmask and (not owned_only or (
                        l1e >= COPIED and e >= COPIED and h < self.io.end and h >> cbits not in self.meta_clusters)):
                    out.append([K_DATA, pos, end - pos, h + (pos & cmask)])
                    return end
        while pos < end:
            l1i = pos >> l1_shift
            table_end = (l1i + 1) << l1_shift
            if table_end > end:
                table_end = end
            l1e = l1[l1i] if l1i < len(l1) else 0
            l2off = l1e & OFFSET_MASK
            if not l2off:
                if owned_only:
                    return STOP
                if out and out[-1][0] == K_UNALLOC:
                    out[-1][2] += table_end - pos
                else:
                    out.append([K_UNALLOC, pos, table_end - pos, 0])
                pos = table_end
                continue
            if owned_only and not l1e & COPIED:
                return STOP
            t = lookup(l2off)
            if t is None:
                if pinned is None or pinned.offset != l2off:
                    return pos
                t = pinned
            ents = t.entries
            while pos < table_end:
                e = ents[(pos >> cbits) & l2_mask]
                n = (pos | cmask) + 1
                if n > table_end:
                    n = table_end
                n -= pos
                # the common case first: a standard entry (COPIED or not)
                if not e & NOT_STANDARD and e & OFFSET_MASK:
                    h = e & OFFSET_MASK
                    if h & cmask:
                        out.append([K_BAD, pos, n, e])
                        return STOP
                    if owned_only and (e < COPIED or h >= self.io.end or h >> cbits in self.meta_clusters):
                        return STOP
                    kind, host = K_DATA, h + (pos & cmask)
                elif e & COMPRESSED:
                    if owned_only:
                        return STOP
                    out.append([K_COMP, pos, n, e])
                    pos += n
                    continue
                elif owned_only:
                    return STOP
                elif e & ZERO:
                    kind, host = K_ZERO, 0
                elif e & OFFSET_MASK:  # reserved bits set
                    out.append([K_BAD, pos, n, e])
                    return STOP
                else:
                    kind, host = K_UNALLOC, 0
                if out:
                    last = out[-1]
                    if last[0] == kind and (kind != K_DATA or last[3] + last[2] == host):
                        last[2] += n
                        pos += n
                        continue
                out.append([kind, pos, n, host])
                pos += n
        return pos

    async def _map(self, offset: int, length: int, owned_only: bool = False) -> list[list[int]] | None:
        """The runs of a guest range (see _map_cached), loading L2 tables as
        needed. An invalid L2 entry is reported as corruption; with
        `owned_only`, None when some cluster is not ours alone (the caller
        then allocates, and the allocator reports invalid entries)."""
        out: list[list[int]] = []
        end = offset + length
        pos = self._map_cached(offset, end, out, owned_only)
        while pos != end:
            if pos == STOP:
                if owned_only:
                    return None
                _, g, _, e = out[-1]
                raise self.corruption(f"L2 entry 0x{e:x} for guest offset 0x{g:x} is invalid")
            index = pos >> self.l1_shift
            t = await self._load_l2(self.l1[index] & OFFSET_MASK, index)
            pos = self._map_cached(pos, end, out, owned_only, t)
        return out

    async def _load_l2(self, off: int, l1_index: int | None = None) -> L2Table:
        t = self.l2cache.lookup(off)
        if t is not None:
            return t
        if off & self.cmask:
            where = f" (L1 index: {c_hex(l1_index)})" if l1_index is not None else ""
            raise self.corruption(f"L2 table offset {c_hex(off)} unaligned{where}")  # QEMU's text
        if off + self.cs > self.io.end:
            raise self.corruption(f"L2 table offset 0x{off:x} is outside the image", off, self.cs)

        async def loader(o: int) -> array:
            return decode_table(await self.io.read(o, self.cs))

        return await self.l2cache.load(off, loader)

    # ------------------------------------------------------- cluster content
    def _comp_range(self, e: int) -> tuple[int, int]:
        coff = e & self.comp_off_mask
        nsec = ((e >> self.comp_shift) & self.comp_sec_mask) + 1
        return coff, nsec * 512 - (coff & 511)

    async def _decompressed(self, e: int) -> bytes:
        if self._last_comp[0] == e:
            return self._last_comp[1]
        coff, csize = self._comp_range(e)
        if coff < self.cs or coff >= self.io.end:
            raise self.corruption(f"compressed cluster at 0x{coff:x} is outside the image")
        raw = await self.io.read(coff, csize)
        data = decompress(bytes(raw), self.cs, self.header.compression_type)
        self._last_comp = (e, data)
        return data

    async def _read_backing(self, g: int, n: int) -> bytes | bytearray | memoryview:
        b = self.backing
        blen = b.getlength() if b is not None else 0
        if g >= blen:
            return bytes(n)
        m = min(n, blen - g)
        assert b is not None
        data = await b.read(g, m)
        return data if m == n else bytes(data) + bytes(n - m)

    async def _cluster_content(self, e: int, cstart: int) -> bytes | bytearray | memoryview:
        """The current guest content of the cluster at `cstart` with L2 entry `e`."""
        cs = self.cs
        if e & COMPRESSED:
            return await self._decompressed(e)
        if e & ZERO:
            return bytes(cs)
        h = e & OFFSET_MASK
        if h:
            return await self.io.read(h, cs)
        if self.backing is not None:
            return await self._read_backing(cstart, cs)
        return bytes(cs)

    # ------------------------------------------------------------- freeing
    def defer_free(self, off: int, nclusters: int, punch: bool = False) -> None:
        """Free host clusters once the metadata that dropped them is durable
        (writeback.py applies the decrements after its fsync)."""
        self.pending_free.append((off, nclusters, punch))

    def _free_entry(self, e: int, guest_discard: bool = False) -> None:
        """Queue the decrement of whatever host clusters L2 entry `e` references."""
        punch = guest_discard and self._pass_discard
        if e & COMPRESSED:
            coff, csize = self._comp_range(e)
            first = coff >> self.cluster_bits
            last = (coff + csize - 1) >> self.cluster_bits
            self.defer_free(first << self.cluster_bits, last - first + 1, punch)
        elif e & OFFSET_MASK:
            self.defer_free(e & OFFSET_MASK, 1, punch)

    # ---------------------------------------------------------- allocation
    async def _l2_for_write(self, l1i: int) -> L2Table:
        """The L2 table for L1 index `l1i`, allocated or copied (when shared with a
        snapshot) so that it may be modified. Lock held."""
        l1e = self.l1[l1i]
        off = l1e & OFFSET_MASK
        if off and l1e & COPIED:
            return self.l2cache.lookup(off) or await self._load_l2(off)
        if off:
            old = await self._load_l2(off)
            ents = array("Q", old.entries)
        else:
            ents = array("Q", bytes(self.cs))
        new = await self.rc.alloc(1)
        if off:
            for i, e in enumerate(ents):
                if not e:
                    continue
                if e & COMPRESSED:
                    ents[i] = e & ~COPIED
                    continue
                h = e & OFFSET_MASK
                if h and await self.rc.get(h >> self.cluster_bits) == 1:
                    ents[i] = e | COPIED
                else:
                    ents[i] = e & ~COPIED
            self.defer_free(off, 1)
        t = L2Table(new, ents, dirty=True)
        self.l2cache.insert(t)
        self.meta_clusters.add(new >> self.cluster_bits)
        self.l1[l1i] = new | COPIED
        self.l1_dirty = True
        return t

    def _keep_cached(self, t: L2Table) -> None:
        t.dirty = True
        if self.l2cache.tables.get(t.offset) is not t:
            self.l2cache.insert(t)

    async def _write_alloc(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write with allocation / copy-on-write as needed. Lock held."""
        mv = memoryview(data).cast("B")
        cbits, mask, cs = self.cluster_bits, self.cmask, self.cs
        writes: list[tuple[int, Any]] = []
        updates: list[tuple[L2Table, int, int]] = []
        frees: list[int] = []
        allocated: list[int] = []  # host offsets of new data clusters
        pos, end = offset, offset + len(mv)
        while pos < end:
            l1i = pos >> self.l1_shift
            t = await self._l2_for_write(l1i)
            table_end = min(end, (l1i + 1) << self.l1_shift)
            while pos < table_end:
                idx = (pos >> cbits) & self.l2_mask
                e = t.entries[idx]
                cstart = pos & ~mask
                in_off = pos - cstart
                n = min(table_end, cstart + cs) - pos
                chunk = mv[pos - offset : pos - offset + n]
                h = e & OFFSET_MASK
                flags = e & (COPIED | COMPRESSED | ZERO)
                if flags == COPIED and h:
                    if h & mask or e & L2_RESERVED or h >= self.io.end:
                        raise self.corruption(f"L2 entry 0x{e:x} for guest offset 0x{pos:x} is invalid")
                    if h >> cbits in self.meta_clusters:
                        raise self.corruption(f"data cluster 0x{h:x} overlaps metadata")
                    writes.append((h + in_off, chunk))
                elif flags == COPIED | ZERO and h and self.version >= 3 and not h & mask \
                        and h < self.io.end and h >> cbits not in self.meta_clusters:
                    # preallocated zero cluster that is ours: fill it in place
                    content = bytearray(cs)
                    content[in_off : in_off + n] = chunk
                    writes.append((h, content))
                    updates.append((t, idx, h | COPIED))
                else:
                    if n == cs:
                        content = chunk
                    else:
                        content = bytearray(await self._cluster_content(e, cstart))
                        content[in_off : in_off + n] = chunk
                    new = await self.rc.alloc(1)
                    allocated.append(new)
                    writes.append((new, content))
                    updates.append((t, idx, new | COPIED))
                    if e & (COMPRESSED | OFFSET_MASK):
                        frees.append(e)
                pos += n
        try:
            await self._write_runs(writes)
        except BaseException:
            # no L2 entry points at the new clusters yet: give them back, or
            # a failed write (ENOSPC) would leak them (QEMU's qcow2_alloc_cluster_abort)
            for h in allocated:
                await self.rc.add(h >> cbits, -1)
            raise
        for t, idx, ne in updates:
            t.entries[idx] = ne
            self._keep_cached(t)
        for e in frees:
            self._free_entry(e)

    async def _write_runs(self, writes: list[tuple[int, Any]]) -> None:
        """Write (host offset, data) pieces, merging the ones that touch."""
        i = 0
        while i < len(writes):
            host, data = writes[i]
            parts = [data]
            end = host + len(data)
            j = i + 1
            while j < len(writes) and writes[j][0] == end:
                parts.append(writes[j][1])
                end += len(writes[j][1])
                j += 1
            await self.io.write(host, parts[0] if len(parts) == 1 else b"".join(parts))
            i = j

    # ------------------------------------------------- zero / discard clusters
    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        """Whole clusters inside the range (the partial last cluster of the image
        counts as whole when the range reaches the image end)."""
        end = offset + length
        a = (offset + self.cmask) & ~self.cmask
        b = end & ~self.cmask
        if end == self.header.size:
            b = (end + self.cmask) & ~self.cmask
        return a, max(a, b)

    async def _set_clusters(self, a: int, b: int, mode: str) -> None:
        """Make whole clusters [a, b) read as zeroes by metadata only. Lock held.
        mode: 'zero' (keep our own allocations, zero flag), 'zero-unmap' or
        'discard' (free the host clusters)."""
        cbits = self.cluster_bits
        backing = self.backing is not None
        v3 = self.version >= 3
        pos = a
        while pos < b:
            l1i = pos >> self.l1_shift
            table_end = min(b, (l1i + 1) << self.l1_shift)
            l1e = self.l1[l1i]
            if not l1e & OFFSET_MASK and not backing:
                pos = table_end  # already reads as zeroes, nothing to free
                continue
            t = await self._l2_for_write(l1i)
            ents = t.entries
            changed = False
            while pos < table_end:
                idx = (pos >> cbits) & self.l2_mask
                e = ents[idx]
                h = e & OFFSET_MASK
                pos += self.cs
                if e & COMPRESSED:
                    h = 0
                    owned = False
                else:
                    owned = bool(e & COPIED and h)
                if not v3:
                    ne = 0
                elif mode == "zero" and owned and not h & self.cmask:
                    ne = h | COPIED | ZERO
                elif mode == "discard" and not backing:
                    ne = 0
                else:
                    ne = ZERO
                if ne == e or (not backing and e in (0, ZERO)):
                    continue
                if not ne & OFFSET_MASK and (e & COMPRESSED or e & OFFSET_MASK):
                    self._free_entry(e, guest_discard=mode != "zero")
                ents[idx] = ne
                changed = True
            if changed:
                self._keep_cached(t)


def c_hex(n: int) -> str:
    """C's %#x, as QEMU's messages print numbers: 0 without the prefix."""
    return f"{n:#x}" if n else "0"
