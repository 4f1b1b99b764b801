"""Qcow2Node: the qcow2 format node (QEMU's qcow2.c): open and its checks,
the backing chain, reads, writes, zeroing, discard, resize, block status,
introspection, and the driver table (probe, create_steps).

Its other halves are mixins on the same state: cluster.py (mapping and
allocation: the one mapping function), writeback.py (crash-safe write-back
order). refcount.py keeps refcounts behind a narrow I/O interface
(imagefile.py); create.py makes new images.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import struct
from array import array
from collections.abc import Callable
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.block import register_driver
from exportd.block.bitmaps import mark_written
from exportd.block.node import BlockNode, BlockStatus, Edge, Perm, Prealloc, Status
from exportd.block.probe import probe_backing_format
from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2.bitmaps import Qcow2Bitmaps
from exportd.block.qcow2.cluster import (
    K_COMP,
    K_DATA,
    K_UNALLOC,
    K_ZERO,
    OFFSET_MASK,
    STOP,
    ClusterMap,
)
from exportd.block.qcow2.compress import zstd_available
from exportd.block.qcow2.compressed_write import CompressedWrites
from exportd.block.qcow2.create import Qcow2Create
from exportd.block.qcow2.imagefile import ImageFile
from exportd.block.qcow2.l2cache import L2Cache, decode_table, encode_table
from exportd.block.qcow2.refcount import Refcounts
from exportd.block.qcow2.reopen import QCOW2_REOPEN_MEMBERS, Qcow2Reopen
from exportd.block.qcow2.snapshots import read_snapshot_table
from exportd.block.qcow2.writeback import Writeback
from exportd.block.write_threshold import check as threshold_check
from exportd.errors import BlockError
from exportd.extents import Extent, zeroes

log = logging.getLogger(__name__)

DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024

MAX_CHAIN_DEPTH = 64
# images whose backing chain is being opened right now, in this task (loop detection)
_OPENING_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcow2_chain", default=())

QCOW2_MEMBERS = frozenset({
    "file", "backing", "lazy-refcounts", "pass-discard-request",
    "pass-discard-snapshot", "pass-discard-other", "discard-no-unref", "overlap-check",
    "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
    "cache-clean-interval", "encrypt", "data-file",
})


@register_driver
class Qcow2Node(ClusterMap, Writeback, CompressedWrites, Qcow2Bitmaps, Qcow2Reopen, BlockNode):
    driver = "qcow2"
    option_members = QCOW2_MEMBERS
    reopen_members = QCOW2_REOPEN_MEMBERS
    supports_backing = True
    is_format = True

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self._file_edge: Edge = None  # type: ignore[assignment]  # the file child's edge (hot path)
        self.io: ImageFile = None  # type: ignore[assignment]
        self.corrupt = False
        self.emit_event: Callable[[str, dict[str, Any]], None] | None = None  # the daemon's, for corruption
        self.meta_clusters: set[int] = set()
        self.pending_free: list[tuple[int, int, bool]] = []  # (host offset, clusters, punch)
        self._pass_discard = False  # punch freed guest-discarded clusters out of the file
        self.l1_dirty = False
        self._lock = asyncio.Lock()
        self._last_comp: tuple[int, bytes] = (-1, b"")
        self._discard_unmap = False
        self.snapshots: list[dict[str, Any]] = []
        self._mark_task: asyncio.Task[None] | None = None
        self.version = 3
        self.bitmap_dir = []  # the persistent bitmaps' directory as on disk (qcow2/bitmaps.py)
        self.bitmap_dir_offset = self.bitmap_dir_size = 0

    # ---------------------------------------------------------- driver table
    @classmethod
    def probe(cls, head: bytes) -> int:
        return 100 if head[:4] == hdr.MAGIC else 0

    @classmethod
    def create_steps(cls, graph: Any, options: dict[str, Any]) -> tuple[Any, Any]:
        return Qcow2Create(graph, options).steps()

    # ------------------------------------------------------------------ open
    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> Qcow2Node:
        if options.get("data-file") is not None:
            raise BlockError("qcow2: external data files ('data-file') are not supported")
        if options.get("encrypt") is not None:
            raise BlockError("qcow2: encryption ('encrypt') is not supported")
        if "file" not in options:
            raise BlockError("Parameter 'file' is missing")
        ro = bool(options.get("read-only", False))
        node = cls(node_name, read_only=ro)
        daemon = getattr(graph, "daemon", None)
        node.emit_event = daemon.emit_event if daemon is not None else None
        node._discard_unmap = options.get("discard") in ("unmap", "on")
        # QEMU's default: pass guest discards down when discard=unmap
        node._pass_discard = bool(options.get("pass-discard-request", node._discard_unmap))
        perm = Perm.CONSISTENT_READ if ro else Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if options.get("force-share"):
            shared = Perm.ALL
        await graph.open_child(options["file"], node, "file", perm, shared, read_only=ro)
        node._file_edge = node.child_edges["file"]
        node.io = ImageFile(node._file_edge, node.corruption)
        await node._load(options)
        await node._open_backing(graph, options)
        return node

    async def _load(self, options: dict[str, Any]) -> None:
        if self.io.end < hdr.V2_HEADER.size:
            raise BlockError("Image is not in qcow2 format")
        head = await self.io.read(0, hdr.V2_HEADER.size)
        if head[:4] != hdr.MAGIC:
            raise BlockError("Image is not in qcow2 format")
        cbits = struct.unpack_from(">I", head, 20)[0]
        if not hdr.MIN_CLUSTER_BITS <= cbits <= hdr.MAX_CLUSTER_BITS:
            raise BlockError(f"Unsupported cluster size: 2^{cbits}")
        first = await self.io.read(0, min(self.io.end, 1 << cbits))
        h = hdr.parse_header(bytes(first), self.io.end)
        bad = hdr.unsupported_features(h)
        if bad:
            raise BlockError(f"Unsupported qcow2 feature(s): {', '.join(bad)}")
        if h.compression_type == hdr.COMPRESSION_ZSTD and not zstd_available():
            raise BlockError("qcow2: the image uses zstd compression but the zstandard package is not installed")
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT and not self.read_only:
            raise BlockError("qcow2: Image is corrupt; cannot be opened read/write")
        if h.incompatible_features & hdr.INCOMPAT_DIRTY and not self.read_only:
            raise BlockError(
                "qcow2: image has the dirty bit set (lazy refcounts); repair it with "
                "'qemu-img check -r all' or open it read-only"
            )
        self.header = h
        self.version = h.version
        self.cluster_bits = cbits
        self.cs = cs = 1 << cbits
        self.cmask = cs - 1
        self.l2_bits = cbits - 3
        self.l2_mask = (1 << self.l2_bits) - 1
        self.l1_shift = cbits + self.l2_bits
        self.comp_shift = 62 - (cbits - 8)
        self.comp_off_mask = (1 << self.comp_shift) - 1
        self.comp_sec_mask = (1 << (cbits - 8)) - 1
        fe = self.io.end

        # L1 table
        if h.l1_size * 8 > hdr.MAX_L1_BYTES:
            raise BlockError("Active L1 table too large")
        need = -(-h.size // (cs << self.l2_bits)) if h.size else 0
        if h.size >= 1 << 62 or need > h.l1_size:
            raise BlockError("L1 table is too small")
        if h.l1_size:
            if h.l1_table_offset & self.cmask or h.l1_table_offset == 0:
                raise BlockError("Invalid L1 table offset")
            if h.l1_table_offset + h.l1_size * 8 > fe:
                raise BlockError("Invalid L1 table offset: points outside the image file")
            self.l1 = decode_table(await self.io.read(h.l1_table_offset, h.l1_size * 8))
        else:
            self.l1 = array("Q")

        # refcount table
        if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > hdr.MAX_REFTABLE_BYTES:
            raise BlockError("Reference count table too large or empty")
        if h.refcount_table_offset & self.cmask or h.refcount_table_offset == 0:
            raise BlockError("Invalid reference count table offset")
        rt_bytes = h.refcount_table_clusters * cs
        if h.refcount_table_offset + rt_bytes > fe:
            raise BlockError("Invalid reference count table offset: points outside the image file")
        self.rc = Refcounts(
            self.io, decode_table(await self.io.read(h.refcount_table_offset, rt_bytes)),
            h.refcount_order if h.version >= 3 else 4, cluster_bits=cbits,
            table_offset=h.refcount_table_offset, meta_clusters=self.meta_clusters,
            defer_free=self.defer_free, move_table=self._move_refcount_table)

        self.snapshots, self.snapshot_table_bytes = await read_snapshot_table(self.io.read, h, fe)

        # L2 cache size (QEMU's option names; sizes in bytes)
        l2_bytes = options.get("l2-cache-size", options.get("cache-size"))
        if l2_bytes is not None:
            if not isinstance(l2_bytes, int) or isinstance(l2_bytes, bool) or l2_bytes < 0:
                raise BlockError("Parameter 'l2-cache-size' expects a non-negative size")
            tables = l2_bytes // cs
        else:
            tables = self._default_l2_tables()
        self._l2_cache_sized = l2_bytes is not None
        self.l2cache = L2Cache(tables)

        await self._open_bitmaps()
        if not self.read_only:
            self._build_meta_set()
            await self._bitmaps_for_writing()
            await self._mark_in_use()

    def _default_l2_tables(self) -> int:
        """QEMU's default: enough to map the whole image, at most 32 MiB."""
        return min(max(len(self.l1), 2), DEFAULT_L2_CACHE_MAX // self.cs)

    def _build_meta_set(self) -> None:
        """Clusters holding metadata: never handed out by the allocator even if a
        damaged image gives them refcount 0."""
        h, cb = self.header, self.cluster_bits
        m = self.meta_clusters
        m.add(0)

        def span(off: int, nbytes: int) -> None:
            if nbytes:
                m.update(range(off >> cb, (off + nbytes - 1 >> cb) + 1))

        span(h.l1_table_offset, len(self.l1) * 8)
        span(h.refcount_table_offset, h.refcount_table_clusters << cb)
        for e in self.rc.table:
            if e & OFFSET_MASK:
                m.add((e & OFFSET_MASK) >> cb)
        for e in self.l1:
            if e & OFFSET_MASK:
                m.add((e & OFFSET_MASK) >> cb)
        if self.snapshots:
            span(h.snapshots_offset, self.snapshot_table_bytes)
            for s in self.snapshots:
                span(s["l1-offset"], s["l1-size"] * 8)

    async def _open_backing(self, graph: Any, options: dict[str, Any]) -> None:
        ref = options.get("backing", ...)
        if ref is None or ref == "":
            return
        if ref is ...:
            name = self.header.backing_file
            if not name:
                return
            if "\0" in name:
                raise BlockError("qcow2: invalid backing file name in the image header")
            if name.startswith("json:"):
                raise BlockError("qcow2: 'json:' backing file names are not supported")
            path = self._backing_path(name)
            fmt = self.header.backing_format
            if fmt is None:
                fmt = await in_own_thread(probe_backing_format, path)
            ref = {"driver": fmt, "file": {"driver": "file", "filename": path}}
        me = os.path.realpath(self._file_edge.node.filename() or self.node_name)
        chain = _OPENING_CHAIN.get()
        if me in chain:
            raise BlockError(f"Backing file loop: '{me}' is its own backing file")
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise BlockError(f"Backing chain deeper than {MAX_CHAIN_DEPTH} images")
        token = _OPENING_CHAIN.set((*chain, me))
        try:
            await graph.open_child(ref, self, "backing", Perm.CONSISTENT_READ, Perm.ALL, read_only=True)
        finally:
            _OPENING_CHAIN.reset(token)

    def _backing_path(self, name: str) -> str:
        """A header's backing file name, relative to the image's directory (as QEMU)."""
        if os.path.isabs(name):
            return name
        f = self.file
        base = f.filename() if f is not None else ""
        return os.path.join(os.path.dirname(base), name) if base else name

    @property
    def file(self) -> BlockNode | None:
        e = self.child_edges.get("file")
        return e.node if e is not None else None

    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def backing(self) -> BlockNode | None:
        e = self.child_edges.get("backing")
        return e.node if e is not None else None

    async def close(self) -> None:
        if self._mark_task is not None:
            await asyncio.gather(self._mark_task, return_exceptions=True)
        if not self.corrupt and self.file is not None:
            async with self._lock:
                await self._store_bitmaps_logged()
        if not self.read_only and not self.corrupt and self.file is not None:
            try:
                await self.flush()
            except OSError:
                log.exception("qcow2 %s: final flush failed", self.node_name)

    # ------------------------------------------------------------ metadata
    async def write_header(self) -> None:
        await self.io.write(0, self.header.pack_fixed())

    async def _move_refcount_table(self, offset: int, clusters: int) -> None:
        """Point the header at a new refcount table (Refcounts grew it) and
        make that durable."""
        h = self.header
        h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
        await self.write_header()
        await self.io.flush()

    def corruption(self, msg: str, offset: int = -1, size: int = -1) -> OSError:
        """Note corrupt metadata: no more writes; like QEMU, a writable v3 image
        gets the corrupt bit so that it is not opened read/write until
        repaired, and the management hears of it once (BLOCK_IMAGE_CORRUPTED,
        the affected host range when known)."""
        if not self.corrupt:
            log.error("qcow2 %s: Marking image as corrupt: %s; further corruption events will be suppressed",
                      self.node_name, msg)
            self.corrupt = True
            if self.emit_event is not None:
                event: dict[str, Any] = {"device": "", "node-name": self.node_name, "msg": msg}
                if offset >= 0:
                    event["offset"] = offset
                if size >= 0:
                    event["size"] = size
                self.emit_event("BLOCK_IMAGE_CORRUPTED", {**event, "fatal": True})
            if not self.read_only and self.version >= 3:
                try:
                    self._mark_task = asyncio.get_running_loop().create_task(self._mark_corrupt())
                except RuntimeError:  # no loop (not expected)
                    pass
        return OSError(errno.EIO, f"qcow2: image corrupt: {msg}")

    async def _mark_corrupt(self) -> None:
        self.header.incompatible_features |= hdr.INCOMPAT_CORRUPT
        try:
            await self.write_header()
            await self.io.flush()
        except OSError as e:
            log.warning("qcow2 %s: could not mark the image corrupt: %s", self.node_name, e)

    # ------------------------------------------------------------ data path
    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        """Reads: standard data clusters (L2 table cached, inside the file) as
        the file's own extents, zero and unallocated clusters as zeroes or
        the backing node's extents; None for compressed clusters, uncached
        L2 tables, invalid entries. Writes: only clusters that are ours
        alone, through the file's mapping; raises as write() would."""
        if write:
            self._check_write(offset, length)
        end = offset + length
        runs: list[list[int]] = []
        if self._map_cached(offset, end, runs, write) != end:
            return None
        if len(runs) == 1 and runs[0][0] == K_DATA:  # the common case: no list to build
            _, _, n, host = runs[0]
            if host + n > self.io.end:
                return None
            f = self._file_edge.node
            return f.map_now(host, n, write=True) if write else f.map_now(host, n)
        fe = self.io.end
        file = self._file_edge.node
        out: list[Extent] = []
        for kind, g, n, host in runs:
            if kind == K_DATA:
                if host + n > fe:
                    return None
                part = file.map_now(host, n, write=write)
            elif kind == K_COMP:
                return None
            elif kind == K_UNALLOC and self.backing is not None:
                part = self._backing_map(g, n)
            else:
                out.append(zeroes(n))
                continue
            if part is None:
                return None
            out += part
        return out

    def _backing_map(self, g: int, n: int) -> list[Extent] | None:
        """The backing node's extents for guest [g, g + n); zeroes past its end."""
        b = self.backing
        assert b is not None
        blen = b.getlength()
        if g >= blen:
            return [zeroes(n)]
        m = min(n, blen - g)
        part = b.map_now(g, m)
        if part is None or m == n:
            return part
        return [*part, zeroes(n - m)]

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        size = self.header.size
        if offset + length > size:
            if offset >= size:
                return bytes(length)
            head = await self.read(offset, size - offset)
            return bytes(head) + bytes(offset + length - size)
        end = offset + length
        mapped: list[list[int]] = []
        runs = mapped if self._map_cached(offset, end, mapped, False) == end else await self._map(offset, length)
        assert runs is not None  # reads get runs or a corruption error
        if len(runs) == 1 and runs[0][0] == K_DATA:
            return await self.io.read(runs[0][3], length)
        buf = bytearray(length)
        mv = memoryview(buf)
        for kind, g, n, host in runs:
            o = g - offset
            if kind == K_DATA:
                mv[o : o + n] = await self.io.read(host, n)
            elif kind == K_UNALLOC:
                if self.backing is not None:
                    mv[o : o + n] = await self._read_backing(g, n)
            elif kind == K_COMP:
                data = await self._decompressed(host)
                c = g & self.cmask
                mv[o : o + n] = data[c : c + n]
        return buf

    # ---------------------------------------------------------------- write
    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "qcow2: node is read-only")
        if self.corrupt:
            raise OSError(errno.EIO, "qcow2: image is corrupt; writes refused")
        if offset < 0 or offset + length > self.header.size:
            raise OSError(errno.ENOSPC, "qcow2: write beyond the end of the image")

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        n = len(data)
        self._check_write(offset, n)
        if not n:
            return
        end = offset + n
        mapped: list[list[int]] = []
        pos = self._map_cached(offset, end, mapped, True)
        runs: list[list[int]] | None = mapped
        if pos != end:  # not all ours, or an L2 table to load first
            runs = None if pos == STOP else await self._map(offset, n, owned_only=True)
        if runs is not None:  # every cluster is ours alone: in place
            if len(runs) == 1:
                await self.io.write(runs[0][3], data)
            else:
                mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
                for _kind, g, m, host in runs:
                    await self.io.write(host, mv[g - offset : g - offset + m])
        else:
            async with self._lock:
                await self._write_alloc(offset, data)
                await self._relieve_cache()
        if fua:
            await self.flush()

    async def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Whole clusters, compressed (compressed_write.py; QEMU's
        BDRV_REQ_WRITE_COMPRESSED). The threshold and dirty bitmaps see it
        as any write (BlockNode wraps only the methods it knows by name)."""
        n = len(data)
        self._check_write(offset, n)
        if not n:
            return
        if self.write_threshold:
            threshold_check(self, offset, n)
        try:
            await self._write_compressed(offset, data)
        finally:
            if self.dirty_bitmaps:
                mark_written(self, offset, n)

    # ------------------------------------------------- write zeroes / discard
    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_write(offset, length)
        if not length:
            return
        a, b = self._aligned_span(offset, length)
        end = offset + length
        if b <= a or (self.version < 3 and self.backing is not None):
            await self._write_zero_bytes(offset, end)
            return
        if offset < a:
            await self._write_zero_bytes(offset, a)
        # as QEMU: unmapping on write-zeroes needs discard=unmap on the node
        unmap = may_unmap and self._discard_unmap
        async with self._lock:
            await self._set_clusters(a, b, "zero-unmap" if unmap else "zero")
            await self._relieve_cache()
        if end > b:
            await self._write_zero_bytes(b, end)

    async def _write_zero_bytes(self, start: int, end: int) -> None:
        step = 1 << 20
        for pos in range(start, end, step):
            n = min(step, end - pos)
            # as QEMU: a piece that already reads as zeroes allocates nothing
            if not await self._reads_as_zero(pos, pos + n):
                await self.write(pos, bytes(n))

    async def _reads_as_zero(self, start: int, end: int) -> bool:
        pos = start
        while pos < end:
            bs = await self.block_status(pos, end - pos)
            if not bs.status & Status.ZERO or bs.length <= 0:
                return False
            pos += bs.length
        return True

    async def discard(self, offset: int, length: int) -> None:
        if not self._discard_unmap or self.read_only or self.corrupt or not length:
            return
        if offset < 0 or offset + length > self.header.size:
            raise OSError(errno.EINVAL, "qcow2: discard beyond the end of the image")
        if self.version < 3 and self.backing is not None:
            return  # no way to hide the backing data without writing; discard is advisory
        a, b = self._aligned_span(offset, length)
        if a < b:
            async with self._lock:
                await self._set_clusters(a, b, "discard")
                await self._relieve_cache()

    async def flush(self) -> None:
        if self.read_only or self.file is None:
            return
        async with self._lock:
            if self.corrupt:
                return
            await self._durable()

    # ------------------------------------------------------------- truncate
    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        self._check_write(0, 0)
        prealloc = Prealloc(prealloc)
        if size < 0 or size % 512:
            raise OSError(errno.EINVAL, "qcow2: the new size must be a multiple of 512")
        async with self._lock:
            old = self.header.size
            if size == old:
                return
            self.check_bitmaps_resizable()
            if size < old:
                if prealloc != Prealloc.OFF:
                    raise OSError(errno.ENOTSUP, "qcow2: preallocation is only possible when growing")
                await self._check_shrink(size, old)
            else:
                if self.snapshots and self.version < 3:
                    raise OSError(errno.ENOTSUP, "qcow2: can't resize a v2 image which has snapshots")
                need = -(-size // (self.cs << self.l2_bits))
                await self._grow_l1(need)
                self.header.size = size
                await self._zero_new_area(old, size)
                if prealloc != Prealloc.OFF:
                    # allocate the new area (as data clusters holding zeroes)
                    step = 1 << 20
                    for pos in range(old, size, step):
                        await self._write_alloc(pos, bytes(min(step, size - pos)))
                        await self._relieve_cache()
            await self._durable()
            self.header.size = size
            await self.write_header()
            await self.io.flush()

    async def _check_shrink(self, size: int, old: int) -> None:
        if self.snapshots:
            raise OSError(errno.ENOTSUP, "qcow2: can't shrink an image which has snapshots")
        step = 64 << 20
        for start in range(size, old, step):
            runs = await self._map(start, min(step, old - start))
            assert runs is not None
            for kind, g, n, host in runs:
                if kind in (K_DATA, K_COMP):
                    data = await self.read(g, n) if kind == K_COMP else await self.io.read(host, n)
                    if any(data):
                        raise OSError(errno.ENOTSUP,
                                      f"qcow2: shrinking to {size} would lose data at offset {g}")

    async def _zero_new_area(self, old: int, new: int) -> None:
        """Growing must not expose stale bytes of the last cluster or backing data."""
        tail_end = min(new, (old + self.cmask) & ~self.cmask)
        if tail_end > old:
            exts = await self._map(old, tail_end - old)
            assert exts is not None
            if any(k in (K_DATA, K_COMP) or (k == K_UNALLOC and self.backing is not None)
                   for k, *_ in exts):
                await self._write_alloc(old, bytes(tail_end - old))
        b = self.backing
        if b is not None and b.getlength() > tail_end:
            zend = min(new, b.getlength())
            if self.version >= 3:
                a2, b2 = tail_end, (zend + self.cmask) & ~self.cmask
                await self._set_clusters(a2, min(b2, (new + self.cmask) & ~self.cmask), "zero")
            else:
                step = 1 << 20
                for pos in range(tail_end, zend, step):
                    await self._write_alloc(pos, bytes(min(step, zend - pos)))

    async def _grow_l1(self, need: int) -> None:
        old_n = len(self.l1)
        if need <= old_n:
            return
        if need * 8 > hdr.MAX_L1_BYTES:
            raise OSError(errno.EFBIG, "qcow2: image size too large for the L1 table limit")
        cs, cb = self.cs, self.cluster_bits
        old_clusters = -(-old_n * 8 // cs)
        new_clusters = -(-need * 8 // cs)
        await self._writeback()  # L1 entries are copied below: their L2 tables must be on disk
        new_l1 = array("Q", self.l1)
        new_l1.extend([0] * (need - old_n))
        h = self.header
        if old_n and new_clusters == old_clusters:
            await self.io.write(h.l1_table_offset + old_n * 8, bytes((need - old_n) * 8))
            await self.io.flush()
            h.l1_size = need
            await self.write_header()
            await self.io.flush()
        else:
            off = await self.rc.alloc(new_clusters)
            data = encode_table(new_l1)
            await self.io.write(off, data + bytes(new_clusters * cs - len(data)))
            await self.rc.write_blocks()
            await self.io.flush()
            await self.rc.write_table()
            await self.io.flush()
            old_off = h.l1_table_offset
            h.l1_table_offset, h.l1_size = off, need
            await self.write_header()
            await self.io.flush()
            self.meta_clusters.update(range(off >> cb, (off >> cb) + new_clusters))
            if old_n:
                self.meta_clusters.difference_update(range(old_off >> cb, (old_off >> cb) + old_clusters))
                self.defer_free(old_off, old_clusters)
        self.l1 = new_l1
        if not self._l2_cache_sized:
            self.l2cache.max_tables = max(self.l2cache.max_tables, self._default_l2_tables())

    # --------------------------------------------------------- block status
    async def block_status(self, offset: int, length: int) -> BlockStatus:
        size = self.header.size
        n = max(0, min(length, size - offset))
        if n == 0:
            return BlockStatus(Status.EOF, 0)
        window = min(n, 8 << self.l1_shift)
        exts = await self._map(offset, window)
        assert exts is not None
        kind = exts[0][0]
        if kind == K_UNALLOC:
            run = exts[0][2]
            b = self.backing
            if b is None:
                st, ln = Status.ZERO, run
                end = offset + run
                if len(exts) == 1 and end < offset + n and not end & ((1 << self.l1_shift) - 1):
                    # skip whole unallocated L2 ranges cheaply (big sparse images)
                    l1, i = self.l1, end >> self.l1_shift
                    while i < len(l1) and not l1[i] & OFFSET_MASK:
                        i += 1
                    ln = min(n, (i << self.l1_shift) - offset)
            else:
                blen = b.getlength()
                if offset >= blen:
                    st, ln = Status.ZERO, run
                else:
                    bs = await b.block_status(offset, min(run, blen - offset))
                    st = bs.status & (Status.DATA | Status.ZERO)
                    ln = max(1, min(bs.length, run))
        elif kind == K_DATA:
            # like QEMU, ask the file: an allocated cluster over a file hole reads as zeroes
            run, host = exts[0][2], exts[0][3]
            st, ln = Status.DATA | Status.ALLOCATED, run
            if host >= self.io.end:
                st |= Status.ZERO
            else:
                fs = await self._file_edge.node.block_status(host, min(run, self.io.end - host))
                if fs.status & Status.ZERO:
                    st |= Status.ZERO
                ln = max(1, min(fs.length, run))
        else:
            st = Status.ZERO | Status.ALLOCATED if kind == K_ZERO else Status.DATA | Status.ALLOCATED
            ln = 0
            for k, _g, m, _h in exts:
                same = k == kind or (kind in (K_DATA, K_COMP) and k in (K_DATA, K_COMP))
                if not same:
                    break
                ln += m
        if offset + ln >= size:
            st |= Status.EOF
        return BlockStatus(st, ln)

    def getlength(self) -> int:
        return self.header.size

    async def allocated_size(self) -> int:
        f = self.file
        return await f.allocated_size() if f is not None else -1

    # -------------------------------------------------------- introspection
    def info(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "lazy-refcounts": bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": 1 << (h.refcount_order if h.version >= 3 else 4),
            "corrupt": bool(h.incompatible_features & hdr.INCOMPAT_CORRUPT) or self.corrupt,
            "extended-l2": False,
            "compression-type": hdr.COMPRESSION_NAMES.get(h.compression_type, "zlib"),
        }
        out: dict[str, Any] = {
            "cluster-size": self.cs,
            "dirty-flag": bool(h.incompatible_features & hdr.INCOMPAT_DIRTY),
            "format-specific": {"type": "qcow2", "data": data},
        }
        if h.backing_file:
            out["backing-filename"] = h.backing_file
            out["full-backing-filename"] = self._backing_path(h.backing_file)
            if h.backing_format:
                out["backing-filename-format"] = h.backing_format
        if self.bitmap_dir:
            data["bitmaps"] = self.bitmaps_info()
        if self.snapshots:
            out["snapshots"] = [
                {"id": s["id"], "name": s["name"], "vm-state-size": s["vm-state-size"],
                 "date-sec": s["date-sec"], "date-nsec": s["date-nsec"],
                 "vm-clock-sec": s["vm-clock-nsec"] // 10**9,
                 "vm-clock-nsec": s["vm-clock-nsec"] % 10**9}
                for s in self.snapshots
            ]
        return out

