"""Creating qcow2 images (QEMU's qcow2_co_create): the layout of a new image
and writing it, to a new host file (`create_qcow2_file`, daemon-free: exportctl
create) or onto an opened node (`create_qcow2_on_node`, and blockdev-create
driver=qcow2 through Qcow2Node.create_steps: `Qcow2Create`).

Layout: cluster 0 header (+ extensions + backing name), then the refcount
table, the refcount blocks, the L1 table and, with preallocation, the L2
tables and the data clusters.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.block.file_create import PREALLOC_MODES, Step, fill, open_new
from exportd.block.node import BlockNode, Edge, Perm, Prealloc
from exportd.block.probe import probe_backing_format
from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2 import refcount_codec
from exportd.block.qcow2.l2cache import encode_table
from exportd.errors import BlockError

COPIED = 1 << 63

# qcow2_layout words its hints for qemu-img's `-o compat=`; in blockdev-create
# the option is `version`, and QEMU's texts say so.
_QMP_HINTS = {"(use compat=1.1 or greater)": "(use version=v3 or greater)"}


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
            full = backing if os.path.isabs(backing) else os.path.join(base_dir, backing)
            backing_fmt = probe_backing_format(full)
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


def create_qcow2_file(path: str, size: int, cluster_size: int | None = None, backing: str | None = None,
                      backing_fmt: str | None = None, preallocation: str = "off", *,
                      refcount_bits: int = 16, compat: str = "1.1", lazy_refcounts: bool = False,
                      compression_type: str = "zlib") -> None:
    """Create (or overwrite) the qcow2 image `path` (synchronous file I/O)."""
    lay = qcow2_layout(size, cluster_size, backing, backing_fmt, preallocation, refcount_bits, compat,
                       lazy_refcounts, compression_type,
                       base_dir=os.path.dirname(os.path.abspath(path)))
    fd = open_new(path)
    try:
        for off, data in lay.writes:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, lay.end)
        fill(fd, lay.data_start, lay.end, preallocation)
        os.fsync(fd)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


async def write_layout(node: BlockNode, lay: Qcow2Layout, preallocation: str) -> None:
    """Replace the contents of an opened, writable node by a new image."""
    mode = Prealloc(preallocation) if preallocation in ("falloc", "full") else Prealloc.OFF
    await node.truncate(0)
    await node.truncate(lay.data_start)
    await node.truncate(lay.end, prealloc=mode)
    for off, data in lay.writes:
        await node.write(off, data)
    await node.flush()


async def create_qcow2_on_node(node: BlockNode, size: int, *, cluster_size: int | None = None,
                               version: str = "v3", backing_file: str | None = None,
                               backing_fmt: str | None = None, preallocation: str = "off",
                               lazy_refcounts: bool = False, refcount_bits: int = 16,
                               compression_type: str = "zlib") -> None:
    """Format an opened, writable node (the caller attaches to `node` with
    WRITE and RESIZE first)."""
    base = os.path.dirname(node.filename()) or "."
    compat = {"v2": "0.10", "v3": "1.1"}.get(version)
    if compat is None:
        raise BlockError(f"Parameter 'version' does not accept value '{version}'")
    lay = qcow2_layout(size, cluster_size, backing_file, backing_fmt, preallocation, refcount_bits,
                       compat, lazy_refcounts, compression_type, base_dir=base)
    await write_layout(node, lay, preallocation)


class Qcow2Create:
    """blockdev-create driver=qcow2: format the node `file` names (or opens)."""

    def __init__(self, graph: Any, opts: dict[str, Any]) -> None:
        self.graph = graph
        self.opts = opts
        self.node: BlockNode | None = None
        self.temporary = False  # `file` was a dict: opened for this job only
        self.user: Edge | None = None
        self.layout: Qcow2Layout | None = None

    def steps(self) -> tuple[Step, Step]:
        return self.prepare, self.work

    async def prepare(self, job: Any) -> None:
        o = self.opts
        if "data-file" in o or o.get("data-file-raw"):
            raise BlockError("External data files are not supported by exportd")
        if o.get("extended-l2"):
            raise BlockError("Extended L2 entries are not supported by exportd")
        ref = o["file"]
        # QEMU's order: open the node, check the options, then take permissions
        if isinstance(ref, str):
            self.node = self.graph.find(ref)
            if self.node is None:  # QEMU looks the name up as a device, then as a node
                raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        else:
            # a nested definition: an implicit node (#blockNNN) for this job's life
            self.node = await self.graph._open(dict(ref))
            self.temporary = True
        try:
            await self._validate()
            self.user = self.node.attach(job, Perm.WRITE | Perm.RESIZE, Perm.ALL, "root")
        except BaseException:
            await self._release()
            raise

    async def _layout(self, prealloc: str) -> Qcow2Layout:
        """Check the options and compute the image's metadata in a worker thread
        (a backing file without a format is probed: a file read; preallocated
        metadata of a large image is a large computation)."""
        assert self.node is not None
        o = self.opts
        compat = {"v2": "0.10", "v3": "1.1"}[o.get("version", "v3")]
        base = os.path.dirname(self.node.filename()) or "."
        try:
            return await in_own_thread(
                qcow2_layout, o["size"], o.get("cluster-size"), o.get("backing-file"),
                o.get("backing-fmt"), prealloc, o.get("refcount-bits", 16), compat,
                o.get("lazy-refcounts", False), o.get("compression-type", "zlib"), base_dir=base)
        except BlockError as e:
            desc = e.desc
            for old, new in _QMP_HINTS.items():
                desc = desc.replace(old, new)
            if desc == e.desc:
                raise
            raise BlockError(desc) from None

    async def _validate(self) -> None:
        """Inside the command (which holds the daemon's command lock): the quick
        checks only. Without preallocation that is the whole layout; with it, the
        layout without preallocation checks the same options (and with a backing
        file the preallocation is refused before any heavy work)."""
        prealloc = self.opts.get("preallocation", "off")
        quick = prealloc if self.opts.get("backing-file") is not None else "off"
        layout = await self._layout(quick)
        self.layout = layout if quick == prealloc else None

    async def work(self, job: Any) -> None:
        assert self.node is not None
        prealloc = self.opts.get("preallocation", "off")
        try:
            lay = self.layout or await self._layout(prealloc)
            await write_layout(self.node, lay, prealloc)
        finally:
            self.layout = None
            await self._release()

    async def _release(self) -> None:
        node, self.node = self.node, None
        if node is None:
            return
        if self.user is not None:
            node.detach(self.user)
            self.user = None
        if self.temporary and node.refcount == 0 and not node.monitor_owned:
            await self.graph._destroy(node)
