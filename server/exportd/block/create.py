"""Image creation without QEMU: raw and qcow2 (docs/interop/qcow2.txt).

`create_image()` is synchronous (plain file I/O); call it from a worker thread
when on the event loop. Errors are BlockError with a message for the user.

qcow2 layout written here: cluster 0 header (+ extensions + backing name),
then the refcount table, the refcount blocks, the L1 table and, with
preallocation, the L2 tables and the data clusters.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

from exportd.block.locking import ImageLock
from exportd.block.node import BlockNode, Perm, Prealloc
from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2 import refcount_codec
from exportd.block.qcow2.l2cache import encode_table
from exportd.errors import BlockError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
COPIED = 1 << 63
_CHUNK = 1 << 20


def create_image(path: str, size: int, fmt: str = "qcow2", cluster_size: int | None = None,
                 backing: str | None = None, backing_fmt: str | None = None,
                 preallocation: str = "off", *, refcount_bits: int = 16, compat: str = "1.1",
                 lazy_refcounts: bool = False, compression_type: str = "zlib") -> None:
    """Create (or overwrite) the image `path` of virtual size `size` bytes."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BlockError("Image size must be a non-negative integer")
    if preallocation not in PREALLOC_MODES:
        raise BlockError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if fmt == "raw":
        if cluster_size is not None or backing is not None or backing_fmt is not None:
            raise BlockError("raw images have no cluster size or backing file")
        _create_raw(path, size, preallocation)
    elif fmt == "qcow2":
        _create_qcow2(path, size, cluster_size, backing, backing_fmt, preallocation,
                      refcount_bits, compat, lazy_refcounts, compression_type)
    else:
        raise BlockError(f"Format '{fmt}' does not support image creation (use raw or qcow2)")


def _open_new(path: str) -> int:
    """Open `path` for (re)creation, emptied, holding QEMU-compatible image locks
    (write + resize, resize not shared), so an image in use by exportd, QEMU or
    qemu-img is refused instead of being destroyed. Closing the fd drops the locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    try:
        ImageLock(fd, path).change(Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.RESIZE)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fill(fd: int, start: int, end: int, mode: str) -> None:
    """Preallocate [start, end) of the file: falloc reserves, full writes zeroes."""
    if end <= start:
        return
    if mode == "falloc":
        os.posix_fallocate(fd, start, end - start)
    elif mode == "full":
        zero = bytes(_CHUNK)
        pos = start
        while pos < end:
            n = min(_CHUNK, end - pos)
            os.pwrite(fd, zero[:n], pos)
            pos += n


def _create_raw(path: str, size: int, prealloc: str) -> None:
    if prealloc == "metadata":
        raise BlockError("Unsupported preallocation mode 'metadata' for raw images")
    fd = _open_new(path)
    try:
        os.ftruncate(fd, size)
        _fill(fd, 0, size, prealloc)
        os.fsync(fd)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


def _probe_backing(base_dir: str, backing: str) -> str:
    full = backing if os.path.isabs(backing) else os.path.join(base_dir, backing)
    try:
        with open(full, "rb") as f:
            return "qcow2" if f.read(4) == hdr.MAGIC else "raw"
    except OSError as e:
        raise BlockError(f"Could not open backing file '{full}': {e.strerror}") from None


def _create_qcow2(path: str, size: int, cluster_size: int | None, backing: str | None,
                  backing_fmt: str | None, prealloc: str, refcount_bits: int, compat: str,
                  lazy_refcounts: bool, compression_type: str) -> None:
    lay = qcow2_layout(size, cluster_size, backing, backing_fmt, prealloc, refcount_bits, compat,
                       lazy_refcounts, compression_type,
                       base_dir=os.path.dirname(os.path.abspath(path)))
    fd = _open_new(path)
    try:
        for off, data in lay.writes:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, lay.end)
        _fill(fd, lay.data_start, lay.end, prealloc)
        os.fsync(fd)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


@dataclass
class Qcow2Layout:
    writes: list[tuple[int, bytes]]  # metadata: (file offset, bytes)
    end: int  # file length
    data_start: int  # preallocated data clusters: [data_start, end)


def qcow2_layout(size: int, cluster_size: int | None = None, backing: str | None = None,
                 backing_fmt: str | None = None, prealloc: str = "off", refcount_bits: int = 16,
                 compat: str = "1.1", lazy_refcounts: bool = False,
                 compression_type: str = "zlib", *, base_dir: str = ".") -> Qcow2Layout:
    """Validate the options and compute a new qcow2 image's metadata."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BlockError("Image size must be a non-negative integer")
    if prealloc not in PREALLOC_MODES:
        raise BlockError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    cs = 65536 if cluster_size is None else cluster_size
    if not isinstance(cs, int) or cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise BlockError("Cluster size must be a power of two between 512 and 2048k")
    cbits = cs.bit_length() - 1
    if size % 512:
        raise BlockError("Image size must be a multiple of 512 bytes")
    if compat in ("1.1", "v3"):
        version = 3
    elif compat in ("0.10", "v2"):
        version = 2
    else:
        raise BlockError(f"Invalid compatibility level: '{compat}'")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise BlockError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and refcount_bits != 16:
        raise BlockError("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
    if version == 2 and lazy_refcounts:
        raise BlockError("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
    ctype = {"zlib": hdr.COMPRESSION_ZLIB, "zstd": hdr.COMPRESSION_ZSTD}.get(compression_type)
    if ctype is None:
        raise BlockError(f"Parameter 'compression-type' does not accept value '{compression_type}'")
    if version == 2 and ctype:
        raise BlockError("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
    if backing is not None:
        if prealloc != "off":
            raise BlockError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        if len(backing.encode()) > hdr.MAX_BACKING_NAME:
            raise BlockError("Backing file name too long")
        if backing_fmt is None:
            backing_fmt = _probe_backing(base_dir, backing)
    elif backing_fmt is not None:
        raise BlockError("Backing format cannot be used without backing file")

    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    if l1_size * 8 > hdr.MAX_L1_BYTES:
        raise BlockError("Image size too large for this cluster size (L1 table limit)")
    l1_clusters = -(-l1_size * 8 // cs)
    data_clusters = -(-size // cs) if prealloc != "off" else 0
    l2_tables = l1_size if prealloc != "off" else 0
    rc_order = refcount_bits.bit_length() - 1
    per_block = cs * 8 // refcount_bits

    # refcount table (rt clusters) and blocks (rb) must cover every cluster, themselves included
    rt, rb = 1, 1
    while True:
        total = 1 + rt + rb + l1_clusters + l2_tables + data_clusters
        need_rb = -(-total // per_block)
        need_rt = -(-need_rb * 8 // cs)
        if need_rb <= rb and need_rt <= rt:
            break
        rb, rt = max(rb, need_rb), max(rt, need_rt)
    if rt * cs > hdr.MAX_REFTABLE_BYTES:
        raise BlockError("Image too large: the refcount table would exceed its size limit")
    rt_off = cs
    rb_off = rt_off + rt * cs
    l1_off = rb_off + rb * cs
    l2_off = l1_off + l1_clusters * cs
    data_off = l2_off + l2_tables * cs
    meta_clusters = 1 + rt + rb + l1_clusters + l2_tables

    h = hdr.Header(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cbits,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_off,
        refcount_table_offset=rt_off, refcount_table_clusters=rt, nb_snapshots=0,
        snapshots_offset=0,
    )
    if version >= 3:
        h.refcount_order = rc_order
        h.header_length = 112
        h.compression_type = ctype
        h.extra_fields = bytes(7)
        if ctype:
            h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
        if lazy_refcounts:
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    if backing_fmt is not None:
        h.extensions.append(hdr.Extension(hdr.EXT_BACKING_FORMAT, backing_fmt.encode()))
    if version >= 3:
        h.extensions.append(hdr.feature_table_ext())
    head = h.pack_fixed() + h.pack_extensions()
    if backing is not None:
        name = backing.encode()
        h.backing_file_offset, h.backing_file_size = len(head), len(name)
        head = h.pack_fixed() + h.pack_extensions() + name
    if len(head) > cs:
        raise BlockError("Header, extensions and backing file name do not fit in one cluster")

    table = array("Q", [rb_off + i * cs for i in range(rb)] + [0] * (rt * cs // 8 - rb))
    used = meta_clusters + data_clusters
    blocks = bytearray()
    for i in range(rb):
        vals = refcount_codec.decode(bytes(cs), refcount_bits)
        for c in range(i * per_block, min(used, (i + 1) * per_block)):
            vals[c - i * per_block] = 1
        blocks += refcount_codec.encode(vals, refcount_bits)
    l1 = array("Q", [0] * l1_size)
    l2_data = bytearray()
    if prealloc != "off":
        for t in range(l1_size):
            l1[t] = (l2_off + t * cs) | COPIED
            ents = array("Q", [0] * l2_entries)
            for j in range(l2_entries):
                g = t * l2_entries + j
                if g < data_clusters:
                    ents[j] = (data_off + g * cs) | COPIED
            l2_data += encode_table(ents)

    writes = [(0, head), (rt_off, encode_table(table)), (rb_off, bytes(blocks))]
    if l1_size:
        l1b = encode_table(l1)
        writes.append((l1_off, l1b + bytes(l1_clusters * cs - len(l1b))))
    if l2_data:
        writes.append((l2_off, bytes(l2_data)))
    end = max(data_off + data_clusters * cs, meta_clusters * cs)
    return Qcow2Layout(writes, end, data_off)


async def create_qcow2_on_node(node: BlockNode, size: int, *, cluster_size: int | None = None,
                               version: str = "v3", backing_file: str | None = None,
                               backing_fmt: str | None = None, preallocation: str = "off",
                               lazy_refcounts: bool = False, refcount_bits: int = 16,
                               compression_type: str = "zlib") -> None:
    """Format an opened, writable node (QMP blockdev-create driver=qcow2: the
    caller attaches to `node` with WRITE and RESIZE first)."""
    base = os.path.dirname(node.filename()) or "."
    compat = {"v2": "0.10", "v3": "1.1"}.get(version)
    if compat is None:
        raise BlockError(f"Parameter 'version' does not accept value '{version}'")
    lay = qcow2_layout(size, cluster_size, backing_file, backing_fmt, preallocation, refcount_bits,
                       compat, lazy_refcounts, compression_type, base_dir=base)
    await node.truncate(0)
    mode = Prealloc(preallocation) if preallocation in ("falloc", "full") else Prealloc.OFF
    await node.truncate(lay.data_start)
    await node.truncate(lay.end, prealloc=mode)
    for off, data in lay.writes:
        await node.write(off, data)
    await node.flush()
