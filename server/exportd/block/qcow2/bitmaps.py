"""Persistent dirty bitmaps in qcow2: the bitmaps extension, the bitmap
directory, bitmap tables and data clusters (docs/interop/qcow2.txt,
"Bitmaps extension" and "Bitmaps"; docs/interop/bitmaps.rst), with QEMU's
behaviour and texts (block/qcow2-bitmap.c). A mixin of Qcow2Node.

Life of a bitmap in the image:
- open: every directory entry becomes a DirtyBitmap on the node (persistent;
  recording when AUTO is set; `inconsistent` when IN_USE is already set: a
  writer died without storing it; `readonly` on a read-only node). Opened
  read-write, IN_USE is set on every entry (the directory rewritten in place
  under a cleared autoclear bit, as QEMU) before any guest write can land,
  so a crash leaves them marked in use.
- close, and reopen to read-only: every persistent bitmap that is neither
  readonly nor inconsistent is written to new clusters with a new table; a
  new directory (IN_USE clear) replaces the old one through the header;
  then the old tables and data clusters are freed.
- block-dirty-bitmap-remove of a persistent bitmap drops its entry and its
  clusters from the image at once.

An extension whose autoclear bit is clear was left by a program that does
not know bitmaps: it is ignored, and dropped from the header when the image
is opened read-write (its clusters leak, as with QEMU)."""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exportd.block import bitmaps as dirty
from exportd.block.bitmaps import DirtyBitmap, Use
from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2.state import Qcow2State
from exportd.errors import BlockError

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved32, directory size, directory offset
ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity bits, name size, extra size

MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000  # entries
MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

TABLE_RESERVED = 0xFF000000000001FE  # bits 1..8 and 56..63 of a table entry
TABLE_OFFSET = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1


@dataclass
class DirEntry:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int  # entries
    flags: int
    granularity_bits: int

    def pack(self) -> bytes:
        name = self.name.encode()
        out = ENTRY.pack(self.table_offset, self.table_size, self.flags, TYPE_DIRTY_TRACKING,
                         self.granularity_bits, len(name), 0) + name
        return out + bytes(-len(out) % 8)


def entry_size(name: str) -> int:
    """calc_dir_entry_size: 24 bytes + the name, 8-aligned."""
    return (ENTRY.size + len(name.encode()) + 7) & ~7


def bitmap_bytes(length: int, granularity: int) -> int:
    """The bytes of bits a bitmap of a node of `length` bytes takes."""
    chunks = -(-length // granularity)
    return -(-chunks // 8)


def table_size_for(length: int, granularity: int, cs: int) -> int:
    """Bitmap table entries (one per data cluster) for such a bitmap."""
    return -(-bitmap_bytes(length, granularity) // cs)


def check_table_entry(e: int, cs: int) -> bool:
    if e & TABLE_RESERVED:
        return False
    off = e & TABLE_OFFSET
    return not off or (not e & TABLE_ALL_ONES and not off % cs)


def parse_extension(data: bytes, cs: int) -> tuple[int, int, int]:
    """(number of bitmaps, directory size, directory offset), QEMU's checks and texts."""
    if len(data) != EXT.size:
        raise BlockError("bitmaps_ext: Invalid extension length")
    nb, reserved, size, offset = EXT.unpack(data)
    if reserved:
        raise BlockError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise BlockError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise BlockError("found bitmaps extension with zero bitmaps")
    if offset % cs:
        raise BlockError("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_DIRECTORY_SIZE:
        raise BlockError(f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size "
                         f"({MAX_DIRECTORY_SIZE})")
    return nb, size, offset


def entry_fits(e: DirEntry, cs: int, length: int) -> bool:
    """QEMU's check_dir_entry."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cs or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & RESERVED_FLAGS or len(e.name.encode()) > MAX_NAME_SIZE):
        return False
    phys = e.table_size * cs
    if phys > MAX_PHYS_SIZE:
        return False
    # an IN_USE bitmap may be of another size (a resize it did not see)
    return bool(e.flags & FLAG_IN_USE) or length <= (phys * 8) << e.granularity_bits


def parse_directory(buf: bytes, nb: int, cs: int, length: int) -> list[DirEntry]:
    """QEMU's bitmap_list_load on the directory's bytes."""
    if not buf:
        raise BlockError("Requested bitmap directory size is zero")
    out: list[DirEntry] = []
    pos, end = 0, len(buf)
    while pos < end:
        if pos + ENTRY.size > end:
            raise BlockError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise BlockError("More bitmaps found than specified in header extension")
        toff, tsize, flags, type_, gbits, name_size, extra = ENTRY.unpack_from(buf, pos)
        nxt = pos + ((ENTRY.size + name_size + extra + 7) & ~7)
        if nxt > end:
            raise BlockError("Broken bitmap directory")
        if extra:
            raise BlockError("Bitmap extra data is not supported")
        raw = buf[pos + ENTRY.size : pos + ENTRY.size + name_size]
        name = raw.decode("utf-8", "surrogateescape")
        e = DirEntry(name, toff, tsize, flags, gbits)
        if type_ != TYPE_DIRTY_TRACKING or not entry_fits(e, cs, length):
            raise BlockError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos = nxt
    if len(out) != nb:
        raise BlockError("Less bitmaps found than specified in header extension")
    return out


def store_constraints(name: str, granularity: int, length: int, cs: int) -> str | None:
    """QEMU's check_constraints_on_bitmap: the reason it cannot be stored, or None."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    nbytes = bitmap_bytes(length, granularity)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cs:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


class Qcow2Bitmaps(Qcow2State):
    """The persistent-bitmap half of Qcow2Node (a mixin: the node's state)."""

    node_name: str
    read_only: bool
    corrupt: bool
    version: int
    dirty_bitmaps: list[DirtyBitmap]
    _lock: asyncio.Lock
    # the directory as it is on disk (empty: no extension) and where it lives
    bitmap_dir: list[DirEntry]
    bitmap_dir_offset: int
    bitmap_dir_size: int

    if TYPE_CHECKING:  # defined by the node
        def getlength(self) -> int: ...
        async def write_header(self) -> None: ...
        async def _durable(self) -> None: ...
        def defer_free(self, off: int, nclusters: int, punch: bool = False) -> None: ...

    # --------------------------------------------------------------- open
    async def _open_bitmaps(self) -> None:
        """Read the extension and directory and put a DirtyBitmap per entry
        on the node. Runs at the image's open, before any guest I/O; a
        read-write open then calls _bitmaps_for_writing."""
        self.bitmap_dir, self.bitmap_dir_offset, self.bitmap_dir_size = [], 0, 0
        h = self.header
        data = h.ext(hdr.EXT_BITMAPS)
        if data is None:
            return
        if not (h.version >= 3 and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS):
            # QEMU warns too; a writer drops the extension (its clusters leak)
            log.warning("qcow2 %s: a program lacking bitmap support modified this file, so all bitmaps are "
                        "now considered inconsistent", self.node_name)
            return
        nb, size, offset = parse_extension(data, self.cs)
        buf = bytes(await self.io.read(offset, size)) if size else b""  # zeroes past the end, as QEMU reads
        entries = parse_directory(buf, nb, self.cs, self.getlength())
        loaded: list[DirtyBitmap] = []
        for e in entries:
            bm = DirtyBitmap(self, e.name, 1 << e.granularity_bits, persistent=True,  # type: ignore[arg-type]
                             enabled=bool(e.flags & FLAG_AUTO))
            if e.flags & FLAG_IN_USE:
                # its data is not to be trusted, not even read; it records
                # nothing (QEMU's bdrv_dirty_bitmap_set_inconsistent)
                bm.inconsistent, bm.enabled = True, False
            else:
                bm.bits.from_bits(await self._read_bitmap_data(e))
            bm.readonly = self.read_only
            loaded.append(bm)
        self.bitmap_dir, self.bitmap_dir_offset, self.bitmap_dir_size = entries, offset, size
        for bm in loaded:
            dirty.attach(bm)  # directory order, each in front: QEMU's list order

    async def _bitmaps_for_writing(self) -> None:
        """Before the first write (open or reopen read-write): a stale
        extension is dropped and autoclear bits other than a live bitmaps
        extension's are cleared (spec rule); the bitmaps' clusters join the
        metadata set."""
        h = self.header
        keep = hdr.AUTOCLEAR_BITMAPS if self.bitmap_dir else 0
        stale = h.ext(hdr.EXT_BITMAPS) is not None and not self.bitmap_dir
        if stale or (h.version >= 3 and h.autoclear_features & ~keep):
            h.extensions = [e for e in h.extensions if e.type != hdr.EXT_BITMAPS or not stale]
            h.autoclear_features &= keep
            await self._write_head()
            await self.io.flush()
        cb = self.cluster_bits
        for off, n in await self.bitmap_clusters():
            self.meta_clusters.update(range(off >> cb, (off >> cb) + n))

    async def _mark_in_use(self, failure: str = "Can't update bitmap directory") -> None:
        """Set IN_USE on every entry (a read-write open): a crash from now on
        leaves them inconsistent. Before any guest write. `failure`: QEMU's
        words for an error (they differ between open and reopen)."""
        if all(e.flags & FLAG_IN_USE for e in self.bitmap_dir):
            return
        for e in self.bitmap_dir:
            e.flags |= FLAG_IN_USE
        try:
            await self._rewrite_directory_in_place()
        except OSError as err:
            raise BlockError(f"{failure}: {os.strerror(err.errno or errno.EIO)}") from None

    async def _read_table(self, e: DirEntry) -> list[int]:
        """A bitmap table, checked entry by entry (bitmap_table_load)."""
        # at most 8 MiB (the directory's checks); zeroes past the file's end, as QEMU reads
        raw = bytes(await self.io.read(e.table_offset, e.table_size * 8))
        table = list(struct.unpack(f">{e.table_size}Q", raw))
        if not all(check_table_entry(t, self.cs) for t in table):
            raise BlockError(f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                             "Invalid argument")
        return table

    async def _read_bitmap_data(self, e: DirEntry) -> bytearray:
        """The bits of a bitmap as stored (load_bitmap_data)."""
        cs = self.cs
        table = await self._read_table(e)
        nbytes = bitmap_bytes(self.getlength(), 1 << e.granularity_bits)
        if -(-nbytes // cs) != e.table_size:
            raise BlockError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
        bits = bytearray(e.table_size * cs)
        for i, t in enumerate(table):
            off = t & TABLE_OFFSET
            if off:
                bits[i * cs : (i + 1) * cs] = await self.io.read(off, cs)
            elif t & TABLE_ALL_ONES:
                bits[i * cs : (i + 1) * cs] = b"\xff" * cs
        return bits

    async def bitmap_clusters(self) -> list[tuple[int, int]]:
        """(offset, clusters) of everything the bitmaps extension holds: the
        directory, every table and data cluster (the metadata set)."""
        out: list[tuple[int, int]] = []
        if not self.bitmap_dir:
            return out
        cs = self.cs
        out.append((self.bitmap_dir_offset, -(-self.bitmap_dir_size // cs)))
        for e in self.bitmap_dir:
            out.append((e.table_offset, -(-e.table_size * 8 // cs)))
            try:
                table = await self._read_table(e)
            except BlockError:
                continue
            out.extend((t & TABLE_OFFSET, 1) for t in table if t & TABLE_OFFSET)
        return out

    # -------------------------------------------------------- the header
    async def _write_head(self) -> None:
        """Rewrite the first cluster: header, extensions, backing file name."""
        await self.io.write(0, hdr.pack_first_cluster(self.header, self.cs))

    def _set_extension(self, entries: list[DirEntry], offset: int, size: int) -> None:
        h = self.header
        others = [e for e in h.extensions if e.type != hdr.EXT_BITMAPS]
        if entries:
            ext = hdr.Extension(hdr.EXT_BITMAPS, EXT.pack(len(entries), 0, size, offset))
            at = next((i for i, e in enumerate(h.extensions) if e.type == hdr.EXT_BITMAPS), len(others))
            others.insert(min(at, len(others)), ext)
            h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        else:
            h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        h.extensions = others
        self.bitmap_dir, self.bitmap_dir_offset, self.bitmap_dir_size = entries, offset, size

    async def _rewrite_directory_in_place(self) -> None:
        """The directory's flags changed, not its size: rewrite it where it is
        while the autoclear bit is clear, so a crash in between leaves an
        extension every reader ignores (update_ext_header_and_dir_in_place)."""
        h = self.header
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        await self.write_header()
        await self.io.flush()
        await self.io.write(self.bitmap_dir_offset, b"".join(e.pack() for e in self.bitmap_dir))
        await self.io.flush()
        h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        await self.write_header()
        await self.io.flush()

    async def _replace_directory(self, entries: list[DirEntry]) -> None:
        """Write `entries` as a new directory in new clusters (none when
        empty), point the header at it, then free the old one
        (update_ext_header_and_dir). Lock held."""
        old_offset, old_size = self.bitmap_dir_offset, self.bitmap_dir_size
        offset = size = 0
        if entries:
            if len(entries) > MAX_BITMAPS:
                raise OSError(errno.EINVAL, "too many bitmaps")
            data = b"".join(e.pack() for e in entries)
            size = len(data)
            if size > MAX_DIRECTORY_SIZE:
                raise OSError(errno.EINVAL, "bitmap directory too large")
            n = -(-size // self.cs)
            offset = await self.rc.alloc(n)
            self.meta_clusters.update(range(offset >> self.cluster_bits, (offset >> self.cluster_bits) + n))
            await self.io.write(offset, data + bytes(n * self.cs - size))
            await self._durable()  # the clusters and their refcounts before the header points there
        saved = (self.header.extensions, self.header.autoclear_features, self.bitmap_dir,
                 self.bitmap_dir_offset, self.bitmap_dir_size)
        self._set_extension(entries, offset, size)
        try:
            await self._write_head()
            await self.io.flush()
        except BaseException:
            (self.header.extensions, self.header.autoclear_features, self.bitmap_dir,
             self.bitmap_dir_offset, self.bitmap_dir_size) = saved
            if offset:
                self._free_span(offset, size)
            raise
        if old_size:
            self._free_span(old_offset, old_size)

    def _free_span(self, offset: int, nbytes: int) -> None:
        n = -(-nbytes // self.cs)
        self.meta_clusters.difference_update(range(offset >> self.cluster_bits, (offset >> self.cluster_bits) + n))
        self.defer_free(offset, n)

    async def _free_bitmap_clusters(self, e: DirEntry) -> None:
        """A bitmap's table and data clusters (free_bitmap_clusters)."""
        try:
            table = await self._read_table(e)
        except BlockError as err:
            log.warning("qcow2 %s: %s (its clusters leak)", self.node_name, err)
            return
        for t in table:
            if t & TABLE_OFFSET:
                self._free_span(t & TABLE_OFFSET, self.cs)
        self._free_span(e.table_offset, e.table_size * 8)

    # ------------------------------------------------------------- store
    async def _write_bitmap(self, bm: DirtyBitmap) -> tuple[int, int]:
        """Write a bitmap's data clusters (only those with a dirty bit) and
        its table to new clusters; (table offset, table entries). Lock held."""
        cs, cb = self.cs, self.cluster_bits
        bits = bm.bits.to_bits()
        tb_size = -(-len(bits) // cs)
        if tb_size > MAX_TABLE_SIZE or tb_size * cs > MAX_PHYS_SIZE:
            raise BlockError(f"Bitmap '{bm.name}' is too big")
        table = [0] * tb_size
        if bm.bits.count:
            view, zero = memoryview(bits), bytes(cs)
            for i in range(tb_size):
                chunk = view[i * cs : (i + 1) * cs]
                if chunk == zero[: len(chunk)]:  # no dirty bit: table entry 0, no cluster
                    continue
                off = await self.rc.alloc(1)
                self.meta_clusters.add(off >> cb)
                table[i] = off
                await self.io.write(off, bytes(chunk) + bytes(cs - len(chunk)))
        n = -(-tb_size * 8 // cs)
        toff = await self.rc.alloc(n)
        self.meta_clusters.update(range(toff >> cb, (toff >> cb) + n))
        raw = struct.pack(f">{tb_size}Q", *table)
        await self.io.write(toff, raw + bytes(n * cs - len(raw)))
        return toff, tb_size

    async def store_bitmaps(self) -> None:
        """Store every persistent bitmap that is ours to write (not readonly,
        not inconsistent) with IN_USE clear (qcow2_store_persistent_dirty_bitmaps).
        Raises BlockError with QEMU's texts. Lock held."""
        length = self.getlength()
        entries = list(self.bitmap_dir)
        by_name = {e.name: i for i, e in enumerate(entries)}
        todo: list[tuple[int, DirtyBitmap]] = []
        drop: list[DirEntry] = []
        dir_size = self.bitmap_dir_size
        for bm in self.dirty_bitmaps:  # newest first: new entries go to the end in that order, as QEMU's
            if not bm.persistent or bm.inconsistent or bm.readonly:
                continue
            why = store_constraints(bm.name, bm.granularity, length, self.cs)
            if why is not None:
                raise BlockError(f"Bitmap '{bm.name}' doesn't satisfy the constraints: {why}")
            i = by_name.get(bm.name)
            if i is None:
                if len(entries) + 1 > MAX_BITMAPS:
                    raise BlockError("Too many persistent bitmaps")
                dir_size += entry_size(bm.name)
                if dir_size > MAX_DIRECTORY_SIZE:
                    raise BlockError("Bitmap directory is too large")
                entries.append(DirEntry(bm.name, 0, 0, 0, 0))
                i = by_name[bm.name] = len(entries) - 1
            else:
                if not entries[i].flags & FLAG_IN_USE:
                    raise BlockError(f"Bitmap '{bm.name}' already exists in the image")
                drop.append(entries[i])
            todo.append((i, bm))
        if not todo:
            return
        if self.read_only:
            raise BlockError("No write access")
        written: list[tuple[int, int]] = []
        try:
            for i, bm in todo:
                toff, tsize = await self._write_bitmap(bm)
                written.append((toff, tsize))
                entries[i] = DirEntry(bm.name, toff, tsize, FLAG_AUTO if bm.enabled else 0,
                                      bm.granularity.bit_length() - 1)
            await self._replace_directory(entries)
        except (OSError, BlockError) as err:
            for (_, bm), (toff, tsize) in zip(todo, written, strict=False):
                await self._free_bitmap_clusters(DirEntry(bm.name, toff, tsize, 0, 0))
            if isinstance(err, BlockError):
                raise
            raise BlockError(f"Failed to update bitmap extension: {os.strerror(err.errno or errno.EIO)}") from None
        for e in drop:
            await self._free_bitmap_clusters(e)
        await self._durable()

    async def _store_bitmaps_logged(self) -> None:
        """At close: what cannot be stored is lost, with QEMU's message."""
        try:
            await self.store_bitmaps()
        except (BlockError, OSError) as err:
            log.error("Lost persistent bitmaps during inactivation of node '%s': %s", self.node_name, err)

    # --------------------------------------------------- reopen (read-only <-> rw)
    def bitmaps_now_readonly(self) -> None:
        """After storing for a reopen to read-only (qcow2_reopen_bitmaps_ro)."""
        for bm in self.dirty_bitmaps:
            if bm.persistent:
                bm.readonly = True

    async def bitmaps_now_writable(self) -> None:
        """A reopen to read-write (qcow2_reopen_bitmaps_rw): every entry must
        have its bitmap in memory; IN_USE is set again and the bitmaps become
        writable. A failure leaves them readonly (QEMU only reports it)."""
        if not self.bitmap_dir:
            for bm in self.dirty_bitmaps:
                bm.readonly = False
            return
        fname = self.io.node.filename()
        need_update = False
        for e in self.bitmap_dir:
            bm = dirty.find(self, e.name)  # type: ignore[arg-type]
            if bm is None:
                raise BlockError(f"Unexpected bitmap '{e.name}' in image '{fname}'")
            if not e.flags & FLAG_IN_USE:
                if not bm.readonly:
                    raise BlockError(f"Corruption: bitmap '{e.name}' is not marked IN_USE in the image "
                                     f"'{fname}' and not marked readonly in RAM")
                if bm.inconsistent:
                    raise BlockError(f"Corruption: bitmap '{e.name}' is inconsistent but is not marked IN_USE "
                                     f"in the image '{fname}'")
                need_update = True
            elif bm.readonly and not bm.inconsistent:
                raise BlockError(f"Corruption: bitmap '{e.name}' is marked IN_USE in the image '{fname}' "
                                 "but it is readonly and consistent in RAM")
        if need_update:
            await self._mark_in_use("Cannot update bitmap directory")
        for bm in self.dirty_bitmaps:
            bm.readonly = False

    # ---------------------------------------------------- the node's hooks
    def check_can_store_bitmap(self, name: str, granularity: int) -> None:
        """qcow2_co_can_store_new_dirty_bitmap."""
        if dirty.find(self, name) is not None:  # type: ignore[arg-type]
            raise BlockError(f"Bitmap already exists: {name}")
        why: str | None
        if self.version < 3:
            why = "Cannot store dirty bitmaps in qcow2 v2 files"
        else:
            why = store_constraints(name, granularity, self.getlength(), self.cs)
        if why is None:
            persistent = [bm.name for bm in self.dirty_bitmaps if bm.persistent]
            if len(persistent) + 1 > MAX_BITMAPS:
                why = "Maximum number of persistent bitmaps is already reached"
            elif sum(map(entry_size, persistent)) + entry_size(name) > MAX_DIRECTORY_SIZE:
                why = "Not enough space in the bitmap directory"
        if why is not None:
            raise BlockError(f"Can't make bitmap '{name}' persistent in '{self.node_name}': {why}")

    async def remove_persistent_bitmap(self, name: str) -> None:
        """qcow2_co_remove_persistent_dirty_bitmap: drop the entry and its
        clusters now; a bitmap the image does not hold is no error."""
        async with self._lock:
            e = next((x for x in self.bitmap_dir if x.name == name), None)
            if e is None:
                return
            try:
                await self._replace_directory([x for x in self.bitmap_dir if x is not e])
            except OSError as err:
                raise BlockError(f"Failed to update bitmap extension: {os.strerror(err.errno or errno.EIO)}") \
                    from None
            await self._free_bitmap_clusters(e)
            await self._durable()

    def bitmaps_info(self) -> list[dict[str, Any]]:
        """format-specific `bitmaps` of qemu-img info / query-named-block-nodes."""
        out = []
        for e in self.bitmap_dir:
            flags = [f for bit, f in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if e.flags & bit]
            out.append({"flags": flags, "name": e.name, "granularity": 1 << e.granularity_bits})
        return out

    def check_bitmaps_resizable(self) -> None:
        """qcow2_truncate_bitmaps_check: every stored bitmap must be in memory
        and usable, so that it is stored again at the new size."""
        for e in self.bitmap_dir:
            bm = dirty.find(self, e.name)  # type: ignore[arg-type]
            if bm is None:
                raise OSError(errno.ENOTSUP, "Cannot resize qcow2 with persistent bitmaps that were not loaded "
                                             "into memory")
            try:
                bm.check(Use.DEFAULT)
            except BlockError as err:
                raise OSError(errno.ENOTSUP, str(err)) from None
