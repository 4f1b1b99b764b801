"""Qcow2Node: the qcow2 format driver (docs/interop/qcow2.txt in qemu/qemu).

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

import asyncio
import contextvars
import errno
import logging
import os
import struct
from array import array
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.block import register_driver
from exportd.block.node import BlockNode, BlockStatus, Perm, Prealloc, Status
from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2.compress import decompress, zstd_available
from exportd.block.qcow2.l2cache import L2Cache, L2Table, decode_table, encode_table
from exportd.block.qcow2.refcount import Refcounts
from exportd.block.qcow2.snapshots import read_snapshot_table
from exportd.errors import BlockError

log = logging.getLogger(__name__)

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9..55 of L1/L2 entries
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L2_RESERVED = 0x1FE  # bits 1..8 of a standard descriptor

K_UNALLOC, K_ZERO, K_DATA, K_COMP = 0, 1, 2, 3
DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024

MAX_CHAIN_DEPTH = 64
# images whose backing chain is being opened right now, in this task (loop detection)
_OPENING_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcow2_chain", default=())

_KNOWN_OPTIONS = {
    "driver", "node-name", "read-only", "auto-read-only", "force-share", "discard", "cache",
    "detect-zeroes", "file", "backing", "lazy-refcounts", "pass-discard-request",
    "pass-discard-snapshot", "pass-discard-other", "discard-no-unref", "overlap-check",
    "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
    "cache-clean-interval", "encrypt", "data-file",
}


@register_driver
class Qcow2Node(BlockNode):
    driver = "qcow2"
    is_format = True

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self.file: BlockNode = None  # type: ignore[assignment]
        self.file_end = 0
        self.corrupt = False
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

    # ------------------------------------------------------------------ open
    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> Qcow2Node:
        for key in options:
            if key not in _KNOWN_OPTIONS:
                raise BlockError(f"Parameter '{key}' is unexpected")
        if options.get("data-file") is not None:
            raise BlockError("qcow2: external data files ('data-file') are not supported")
        if options.get("encrypt") is not None:
            raise BlockError("qcow2: encryption ('encrypt') is not supported")
        if "file" not in options:
            raise BlockError("Parameter 'file' is missing")
        ro = bool(options.get("read-only", False))
        node = cls(node_name, read_only=ro)
        node._discard_unmap = options.get("discard") in ("unmap", "on")
        # QEMU's default: pass guest discards down when discard=unmap
        node._pass_discard = bool(options.get("pass-discard-request", node._discard_unmap))
        perm = Perm.CONSISTENT_READ if ro else Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if options.get("force-share"):
            shared = Perm.ALL
        node.file = await graph.open_child(options["file"], node, "file", perm, shared, read_only=ro)
        await node._load(options)
        await node._open_backing(graph, options)
        return node

    async def _load(self, options: dict[str, Any]) -> None:
        self.file_end = self.file.getlength()
        if self.file_end < hdr.V2_HEADER.size:
            raise BlockError("Image is not in qcow2 format")
        head = await self.pread(0, hdr.V2_HEADER.size)
        if head[:4] != hdr.MAGIC:
            raise BlockError("Image is not in qcow2 format")
        cbits = struct.unpack_from(">I", head, 20)[0]
        if not hdr.MIN_CLUSTER_BITS <= cbits <= hdr.MAX_CLUSTER_BITS:
            raise BlockError(f"Unsupported cluster size: 2^{cbits}")
        first = await self.pread(0, min(self.file_end, 1 << cbits))
        h = hdr.parse_header(bytes(first), self.file_end)
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
        fe = self.file_end

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
            self.l1 = decode_table(await self.pread(h.l1_table_offset, h.l1_size * 8))
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
        self.rc = Refcounts(self, decode_table(await self.pread(h.refcount_table_offset, rt_bytes)),
                            h.refcount_order if h.version >= 3 else 4)

        self.snapshots, self.snapshot_table_bytes = await read_snapshot_table(self.pread, h, fe)

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

        if not self.read_only:
            self._build_meta_set()
            if h.version >= 3 and h.autoclear_features:
                # we do not maintain bitmaps: clear the bits before writing (spec rule)
                h.autoclear_features = 0
                await self.write_header()
                await self.fsync()

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
                fmt = await in_own_thread(_probe_format, path)
            ref = {"driver": fmt, "file": {"driver": "file", "filename": path}}
        me = os.path.realpath(self.file.filename() or self.node_name)
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
        base = self.file.filename() if self.file is not None else ""
        return os.path.join(os.path.dirname(base), name) if base else name

    @property
    def backing(self) -> BlockNode | None:
        return self.children.get("backing")

    async def close(self) -> None:
        if self._mark_task is not None:
            await asyncio.gather(self._mark_task, return_exceptions=True)
        if not self.read_only and not self.corrupt and self.file is not None:
            try:
                await self.flush()
            except OSError:
                log.exception("qcow2 %s: final flush failed", self.node_name)

    # ---------------------------------------------------------- file helpers
    async def pread(self, off: int, n: int) -> bytes | bytearray | memoryview:
        fe = self.file_end
        if off + n <= fe:
            return await self.file.read(off, n)
        if off >= fe:
            return bytes(n)
        d = await self.file.read(off, fe - off)
        return bytes(d) + bytes(n - (fe - off))

    async def pwrite(self, off: int, data: bytes | bytearray | memoryview) -> None:
        await self.file.write(off, data)
        end = off + len(data)
        if end > self.file_end:
            self.file_end = end

    async def fsync(self) -> None:
        await self.file.flush()

    async def write_header(self) -> None:
        await self.pwrite(0, self.header.pack_fixed())

    def corruption(self, msg: str) -> OSError:
        """Note corrupt metadata: no more writes; like QEMU, a writable v3 image
        gets the corrupt bit so that it is not opened read/write until repaired."""
        if not self.corrupt:
            log.error("qcow2 %s: image corrupt: %s", self.node_name, msg)
            self.corrupt = True
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
            await self.fsync()
        except OSError as e:
            log.warning("qcow2 %s: could not mark the image corrupt: %s", self.node_name, e)

    def defer_free(self, off: int, nclusters: int, punch: bool = False) -> None:
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

    # ------------------------------------------------------------- mapping
    async def _load_l2(self, off: int) -> L2Table:
        t = self.l2cache.lookup(off)
        if t is not None:
            return t
        if off & self.cmask or off + self.cs > self.file_end:
            raise self.corruption(f"L2 table offset 0x{off:x} misaligned or outside the image")

        async def loader(o: int) -> array:
            return decode_table(await self.pread(o, self.cs))

        return await self.l2cache.load(off, loader)

    def _comp_range(self, e: int) -> tuple[int, int]:
        coff = e & self.comp_off_mask
        nsec = ((e >> self.comp_shift) & self.comp_sec_mask) + 1
        return coff, nsec * 512 - (coff & 511)

    async def _extents(self, offset: int, length: int) -> list[list[int]]:
        """[kind, guest offset, length, host offset or L2 entry] runs for a range."""
        out: list[list[int]] = []
        cbits, mask, l2_mask, l1 = self.cluster_bits, self.cmask, self.l2_mask, self.l1
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos >> self.l1_shift
            table_end = min(end, (l1i + 1) << self.l1_shift)
            l2off = (l1[l1i] & OFFSET_MASK) if l1i < len(l1) else 0
            if not l2off:
                if out and out[-1][0] == K_UNALLOC:
                    out[-1][2] += table_end - pos
                else:
                    out.append([K_UNALLOC, pos, table_end - pos, 0])
                pos = table_end
                continue
            t = self.l2cache.lookup(l2off) or await self._load_l2(l2off)
            ents = t.entries
            while pos < table_end:
                e = ents[(pos >> cbits) & l2_mask]
                n = min(table_end, (pos | mask) + 1) - pos
                if e & COMPRESSED:
                    out.append([K_COMP, pos, n, e])
                    pos += n
                    continue
                if e & ZERO:
                    kind, host = K_ZERO, 0
                else:
                    h = e & OFFSET_MASK
                    if not h:
                        kind, host = K_UNALLOC, 0
                    else:
                        if h & mask or e & L2_RESERVED:
                            raise self.corruption(f"L2 entry 0x{e:x} for guest offset 0x{pos:x} is invalid")
                        kind, host = K_DATA, h + (pos & mask)
                if out:
                    last = out[-1]
                    if last[0] == kind and (kind != K_DATA or last[3] + last[2] == host):
                        last[2] += n
                        pos += n
                        continue
                out.append([kind, pos, n, host])
                pos += n
        return out

    # ----------------------------------------------------------------- read
    def read_now(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """read() for callers on the loop: the hot path only (one cluster of
        standard data, L2 table cached, image file that answers at once);
        None otherwise (the caller awaits read())."""
        if length <= 0 or offset + length > self.header.size \
                or (offset ^ (offset + length - 1)) >> self.cluster_bits:
            return None
        t = self.l2cache.lookup(self.l1[offset >> self.l1_shift] & OFFSET_MASK)
        if t is None:
            return None
        e = t.entries[(offset >> self.cluster_bits) & self.l2_mask]
        h = e & OFFSET_MASK
        if not h or e & (COMPRESSED | ZERO | L2_RESERVED) or h & self.cmask:
            return None
        h += offset & self.cmask
        file_read_now = getattr(self.file, "read_now", None)
        if file_read_now is None or h + length > self.file_end:
            return None
        return file_read_now(h, length)

    def read_sources_now(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """read()'s bytes as image file pieces to splice (fuse/splice.py):
        standard data clusters whose L2 tables are cached, in a file that
        offers pieces itself; None for anything else (the caller reads)."""
        file_sources = getattr(self.file, "read_sources_now", None)
        if file_sources is None or length <= 0 or offset + length > self.header.size:
            return None
        out: list[tuple[int, int, int]] = []
        cbits, cmask, l2_mask, l1_shift = self.cluster_bits, self.cmask, self.l2_mask, self.l1_shift
        pos, end = offset, offset + length
        run_host = run_len = 0
        while pos < end:
            t = self.l2cache.lookup(self.l1[pos >> l1_shift] & OFFSET_MASK)
            if t is None:
                return None
            e = t.entries[(pos >> cbits) & l2_mask]
            h = e & OFFSET_MASK
            if not h or e & (COMPRESSED | ZERO | L2_RESERVED) or h & cmask:
                return None
            n = min(end, (pos | cmask) + 1) - pos
            h += pos & cmask
            if h + n > self.file_end:
                return None
            if run_len and run_host + run_len == h:
                run_len += n
            else:
                if run_len:
                    out.append((run_host, run_len))
                run_host, run_len = h, n
            pos += n
        out.append((run_host, run_len))
        pieces: list[tuple[int, int, int]] = []
        for host, n in out:
            found = file_sources(host, n)
            if found is None:
                return None
            pieces.extend(found)
        return pieces

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """write() (without FUA) for callers on the loop: the hot path only
        (one cluster that is ours alone, L2 table cached, image file that
        takes it at once); False, having done nothing, otherwise."""
        n = len(data)
        self._check_write(offset, n)
        if not n or (offset ^ (offset + n - 1)) >> self.cluster_bits:
            return not n
        l1e = self.l1[offset >> self.l1_shift]
        if not l1e & COPIED:
            return False
        t = self.l2cache.lookup(l1e & OFFSET_MASK)
        if t is None:
            return False
        e = t.entries[(offset >> self.cluster_bits) & self.l2_mask]
        h = e & OFFSET_MASK
        if e & (COPIED | COMPRESSED | ZERO | L2_RESERVED) != COPIED or not h \
                or h & self.cmask or h >= self.file_end \
                or h >> self.cluster_bits in self.meta_clusters:
            return False
        file_write_now = getattr(self.file, "write_now", None)
        return file_write_now is not None and file_write_now(h + (offset & self.cmask), data)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        size = self.header.size
        if offset + length > size:
            if offset >= size:
                return bytes(length)
            head = await self.read(offset, size - offset)
            return bytes(head) + bytes(offset + length - size)
        if (offset ^ (offset + length - 1)) >> self.cluster_bits == 0:
            # hot path: one cluster, standard data, L2 table cached
            l1i = offset >> self.l1_shift
            t = self.l2cache.lookup(self.l1[l1i] & OFFSET_MASK)
            if t is not None:
                e = t.entries[(offset >> self.cluster_bits) & self.l2_mask]
                h = e & OFFSET_MASK
                if h and not e & (COMPRESSED | ZERO | L2_RESERVED) and not h & self.cmask:
                    return await self.pread(h + (offset & self.cmask), length)
        exts = await self._extents(offset, length)
        if len(exts) == 1 and exts[0][0] == K_DATA:
            return await self.pread(exts[0][3], length)
        buf = bytearray(length)
        mv = memoryview(buf)
        for kind, g, n, host in exts:
            o = g - offset
            if kind == K_DATA:
                mv[o : o + n] = await self.pread(host, n)
            elif kind == K_UNALLOC:
                if self.backing is not None:
                    mv[o : o + n] = await self._read_backing(g, n)
            elif kind == K_COMP:
                data = await self._decompressed(host)
                c = g & self.cmask
                mv[o : o + n] = data[c : c + n]
        return buf

    async def _read_backing(self, g: int, n: int) -> bytes | bytearray | memoryview:
        b = self.backing
        blen = b.getlength() if b is not None else 0
        if g >= blen:
            return bytes(n)
        m = min(n, blen - g)
        data = await b.read(g, m)
        return data if m == n else bytes(data) + bytes(n - m)

    async def _decompressed(self, e: int) -> bytes:
        if self._last_comp[0] == e:
            return self._last_comp[1]
        coff, csize = self._comp_range(e)
        if coff < self.cs or coff >= self.file_end:
            raise self.corruption(f"compressed cluster at 0x{coff:x} is outside the image")
        raw = await self.pread(coff, csize)
        data = decompress(bytes(raw), self.cs, self.header.compression_type)
        self._last_comp = (e, data)
        return data

    async def _cluster_content(self, e: int, cstart: int) -> bytes | bytearray | memoryview:
        """The current guest content of the cluster at `cstart` with L2 entry `e`."""
        cs = self.cs
        if e & COMPRESSED:
            return await self._decompressed(e)
        if e & ZERO:
            return bytes(cs)
        h = e & OFFSET_MASK
        if h:
            return await self.pread(h, cs)
        if self.backing is not None:
            return await self._read_backing(cstart, cs)
        return bytes(cs)

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
        if (offset ^ (offset + n - 1)) >> self.cluster_bits == 0 and not fua:
            # hot path: one cluster that is ours alone (COPIED), L2 table cached
            l1e = self.l1[offset >> self.l1_shift]
            if l1e & COPIED:
                t = self.l2cache.lookup(l1e & OFFSET_MASK)
                if t is not None:
                    e = t.entries[(offset >> self.cluster_bits) & self.l2_mask]
                    h = e & OFFSET_MASK
                    if e & (COPIED | COMPRESSED | ZERO | L2_RESERVED) == COPIED and h \
                            and not h & self.cmask and h < self.file_end \
                            and h >> self.cluster_bits not in self.meta_clusters:
                        await self.file.write(h + (offset & self.cmask), data)
                        return
        runs = await self._inplace_runs(offset, n)
        if runs is not None:
            mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
            if len(runs) == 1:
                await self.pwrite(runs[0][0], data)
            else:
                for host, o, m in runs:
                    await self.pwrite(host, mv[o : o + m])
        else:
            async with self._lock:
                await self._write_alloc(offset, data)
                await self._relieve_cache()
        if fua:
            await self.flush()

    async def _inplace_runs(self, offset: int, length: int) -> list[list[int]] | None:
        """Host runs when every cluster of the range is ours alone (COPIED data)."""
        runs: list[list[int]] = []
        cbits, mask, l2_mask, l1 = self.cluster_bits, self.cmask, self.l2_mask, self.l1
        fe = self.file_end
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos >> self.l1_shift
            l1e = l1[l1i] if l1i < len(l1) else 0
            if not l1e & COPIED or not l1e & OFFSET_MASK:
                return None
            off = l1e & OFFSET_MASK
            t = self.l2cache.lookup(off) or await self._load_l2(off)
            ents = t.entries
            table_end = min(end, (l1i + 1) << self.l1_shift)
            while pos < table_end:
                e = ents[(pos >> cbits) & l2_mask]
                if e & (COPIED | COMPRESSED | ZERO) != COPIED:
                    return None
                h = e & OFFSET_MASK
                if not h or h & mask or h >= fe or h >> cbits in self.meta_clusters:
                    return None  # the locked path reports the problem
                n = min(table_end, (pos | mask) + 1) - pos
                host = h + (pos & mask)
                if runs and runs[-1][0] + runs[-1][2] == host:
                    runs[-1][2] += n
                else:
                    runs.append([host, pos - offset, n])
                pos += n
        return runs

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
                    if h & mask or e & L2_RESERVED or h >= self.file_end:
                        raise self.corruption(f"L2 entry 0x{e:x} for guest offset 0x{pos:x} is invalid")
                    if h >> cbits in self.meta_clusters:
                        raise self.corruption(f"data cluster 0x{h:x} overlaps metadata")
                    writes.append((h + in_off, chunk))
                elif flags == COPIED | ZERO and h and self.version >= 3 and not h & mask \
                        and h < self.file_end and h >> cbits not in self.meta_clusters:
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
                    writes.append((new, content))
                    updates.append((t, idx, new | COPIED))
                    if e & (COMPRESSED | OFFSET_MASK):
                        frees.append(e)
                pos += n
        await self._write_runs(writes)
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
            await self.pwrite(host, parts[0] if len(parts) == 1 else b"".join(parts))
            i = j

    # ------------------------------------------------- write zeroes / discard
    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        """Whole clusters inside the range (the partial last cluster of the image
        counts as whole when the range reaches the image end)."""
        end = offset + length
        a = (offset + self.cmask) & ~self.cmask
        b = end & ~self.cmask
        if end == self.header.size:
            b = (end + self.cmask) & ~self.cmask
        return a, max(a, b)

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

    # ------------------------------------------------------------ writeback
    async def _writeback(self) -> None:
        """Write dirty metadata in crash-safe order (see module docstring). Lock held."""
        dirty_l2 = self.l2cache.dirty_tables()
        if self.rc.dirty() or dirty_l2 or self.l1_dirty:
            await self.rc.write_blocks()
            if self.rc.table_dirty:
                await self.fsync()
                await self.rc.write_table()
            if dirty_l2 or self.l1_dirty:
                await self.fsync()
                fixed = self._fixed_metadata()
                for t in dirty_l2:
                    if t.offset >> self.cluster_bits in fixed:
                        raise self.corruption(f"L2 table at 0x{t.offset:x} overlaps other metadata")
                for t in dirty_l2:
                    await self.pwrite(t.offset, encode_table(t.entries))
                    t.dirty = False
                if self.l1_dirty:
                    await self.fsync()
                    await self.pwrite(self.header.l1_table_offset, encode_table(self.l1))
                    self.l1_dirty = False
        if self.pending_free:
            await self.fsync()
            frees, self.pending_free = self.pending_free, []
            cb = self.cluster_bits
            punch: list[int] = []
            for off, n, want_punch in frees:
                for ci in range(off >> cb, (off >> cb) + n):
                    if await self.rc.add(ci, -1) == 0:
                        self.l2cache.drop(ci << cb)
                        self.meta_clusters.discard(ci)
                        if self._last_comp[0] != -1:
                            self._last_comp = (-1, b"")
                        if want_punch:
                            punch.append(ci)
            # unreferenced on disk already: giving the space back is safe
            for ci in sorted(set(punch)):
                try:
                    await self.file.discard(ci << cb, self.cs)
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

    async def flush(self) -> None:
        if self.read_only or self.file is None:
            return
        async with self._lock:
            if self.corrupt:
                return
            await self._writeback()
            await self.rc.write_blocks()  # decrements applied just now
            await self.fsync()

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
            await self._writeback()
            await self.rc.write_blocks()
            await self.fsync()
            self.header.size = size
            await self.write_header()
            await self.fsync()

    async def _check_shrink(self, size: int, old: int) -> None:
        if self.snapshots:
            raise OSError(errno.ENOTSUP, "qcow2: can't shrink an image which has snapshots")
        step = 64 << 20
        for start in range(size, old, step):
            for kind, g, n, host in await self._extents(start, min(step, old - start)):
                if kind in (K_DATA, K_COMP):
                    data = await self.read(g, n) if kind == K_COMP else await self.pread(host, n)
                    if any(data):
                        raise OSError(errno.ENOTSUP,
                                      f"qcow2: shrinking to {size} would lose data at offset {g}")

    async def _zero_new_area(self, old: int, new: int) -> None:
        """Growing must not expose stale bytes of the last cluster or backing data."""
        tail_end = min(new, (old + self.cmask) & ~self.cmask)
        if tail_end > old:
            exts = await self._extents(old, tail_end - old)
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
            await self.pwrite(h.l1_table_offset + old_n * 8, bytes((need - old_n) * 8))
            await self.fsync()
            h.l1_size = need
            await self.write_header()
            await self.fsync()
        else:
            off = await self.rc.alloc(new_clusters)
            data = encode_table(new_l1)
            await self.pwrite(off, data + bytes(new_clusters * cs - len(data)))
            await self.rc.write_blocks()
            await self.fsync()
            await self.rc.write_table()
            await self.fsync()
            old_off = h.l1_table_offset
            h.l1_table_offset, h.l1_size = off, need
            await self.write_header()
            await self.fsync()
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
        exts = await self._extents(offset, window)
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
            if host >= self.file_end:
                st |= Status.ZERO
            else:
                fs = await self.file.block_status(host, min(run, self.file_end - host))
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
        return await self.file.allocated_size() if self.file is not None else -1

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
        if self.snapshots:
            out["snapshots"] = [
                {"id": s["id"], "name": s["name"], "vm-state-size": s["vm-state-size"],
                 "date-sec": s["date-sec"], "date-nsec": s["date-nsec"],
                 "vm-clock-sec": s["vm-clock-nsec"] // 10**9,
                 "vm-clock-nsec": s["vm-clock-nsec"] % 10**9}
                for s in self.snapshots
            ]
        return out


def _probe_format(path: str) -> str:
    """Format of a backing file with no recorded format: qcow2 by magic, else raw."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == hdr.MAGIC else "raw"
    except OSError as e:
        raise BlockError(f"Could not open backing file '{path}': {e.strerror}") from None
