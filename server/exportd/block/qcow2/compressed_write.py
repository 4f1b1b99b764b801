"""Compressed cluster writes (QEMU's qcow2_co_pwritev_compressed_part and
qcow2_alloc_compressed_cluster_offset in block/qcow2.c and
qcow2-cluster.c, qcow2_alloc_bytes in qcow2-refcount.c): what a backup job
with `compress: true` writes to a qcow2 target.

Only whole, aligned clusters are written this way (the image's partial last
cluster counts as whole, zero-padded), and only to a cluster that holds
nothing yet (no host offset in its L2 entry; a zero flag alone is fine):
compression never overwrites, as in QEMU (EIO otherwise). A cluster whose
compressed form is not smaller than a cluster is written uncompressed.

Compressed data are packed at byte granularity (docs/interop/qcow2.txt,
"Compressed Clusters Descriptor"): the next piece starts where the last one
ended (`_free_byte_offset`), in the same host cluster if it fits, running on
into the next host cluster when that is the one allocated next, else at the
start of a new one. Every host cluster a piece touches gets one more
reference, so a host cluster is free once all its pieces are freed. The L2
entry holds the host byte offset and the number of 512-byte sectors the
piece reaches into after its first, and never the COPIED flag.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from exportd.aio.threads import in_io_thread
from exportd.block.qcow2.cluster import COMPRESSED, OFFSET_MASK
from exportd.block.qcow2.compress import compress
from exportd.block.qcow2.l2cache import L2Table
from exportd.block.qcow2.state import Qcow2State


class CompressedWrites(Qcow2State):
    """The compressed-write half of Qcow2Node (a mixin: the node's state)."""

    l1_shift: int
    l2_mask: int
    comp_shift: int
    comp_off_mask: int
    comp_sec_mask: int
    # where the next compressed piece may start (inside a host cluster that
    # already holds pieces), 0 for "start a new host cluster"
    _free_byte_offset: int = 0

    if TYPE_CHECKING:  # defined by the node and its other halves
        _lock: asyncio.Lock

        async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None: ...
        async def _l2_for_write(self, l1i: int) -> L2Table: ...
        def _keep_cached(self, t: L2Table) -> None: ...
        async def _relieve_cache(self) -> None: ...

    async def _write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole clusters compressed (each on its own), those that do
        not shrink uncompressed. The node's public write_compressed wraps
        this with the write checks and the dirty bitmap marking."""
        cs, size = self.cs, self.header.size
        n = len(data)
        if offset & self.cmask or (n & self.cmask and offset + n != size):
            raise OSError(errno.EINVAL, "qcow2: compressed writes take whole, aligned clusters")
        mv = memoryview(data).cast("B")
        ctype = self.header.compression_type
        for pos in range(0, n, cs):
            chunk = mv[pos : pos + cs]
            plain = bytes(chunk) if len(chunk) == cs else bytes(chunk) + bytes(cs - len(chunk))
            packed = await in_io_thread(compress, plain, cs, ctype)
            if packed is None:
                await self.write(offset + pos, chunk)
                continue
            async with self._lock:
                await self._place_compressed(offset + pos, packed)
                await self._relieve_cache()

    async def _place_compressed(self, guest: int, packed: bytes) -> None:
        """Allocate bytes for one compressed cluster, write them, point the
        guest cluster's L2 entry at them. Lock held; the metadata reaches
        the disk by write-back (refcounts before the L2 table)."""
        l1i = guest >> self.l1_shift
        t = await self._l2_for_write(l1i)
        idx = (guest >> self.cluster_bits) & self.l2_mask
        if t.entries[idx] & OFFSET_MASK:
            # QEMU: "Compression can't overwrite anything"
            raise OSError(errno.EIO, "qcow2: a compressed write needs a cluster that is not allocated yet")
        host = await self._alloc_bytes(len(packed))
        await self.io.write(host, packed)
        extra_sectors = (host + len(packed) - 1) // 512 - host // 512
        assert host & self.comp_off_mask == host and extra_sectors & self.comp_sec_mask == extra_sectors
        t.entries[idx] = COMPRESSED | extra_sectors << self.comp_shift | host
        self._keep_cached(t)

    async def _alloc_bytes(self, size: int) -> int:
        """qcow2_alloc_bytes: `size` bytes (at most a cluster) of host space,
        packed after the last compressed piece; the host clusters they touch
        get one reference more each."""
        cb, cs, rc = self.cluster_bits, self.cs, self.rc
        offset = self._free_byte_offset
        if offset and await rc.get(offset >> cb) == rc.max_value:
            offset = 0
        free_in_cluster = cs - (offset & self.cmask)
        if not offset or free_in_cluster < size:
            new = await rc.alloc(1)  # its refcount is 1: the piece's reference there
            if offset and ((offset + self.cmask) & ~self.cmask) == new:
                await rc.add(offset >> cb, 1)  # the piece starts in the old cluster, ends in the new
            else:
                offset = new
        else:
            await rc.add(offset >> cb, 1)
        end = offset + size
        self._free_byte_offset = end if end & self.cmask else 0
        return offset

    def _forget_free_bytes(self, cluster_index: int) -> None:
        """A host cluster was freed: compressed pieces must not go on there."""
        if self._free_byte_offset and self._free_byte_offset >> self.cluster_bits == cluster_index:
            self._free_byte_offset = 0
