"""qcow2 image header: parsing with bounds checks, extensions, serialization.

Layout from docs/interop/qcow2.txt (qemu/qemu). Every value read from the
file is checked before it is used to size an allocation or locate a table,
so a hostile header gives a BlockError, never a crash or a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from exportd.errors import BlockError

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
V3_FIELDS = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length
V3_HEADER_MIN = 104

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's implementation limit
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's limit for the active L1 table
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's limit for the refcount table
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_HOST_OFFSET = 1 << 56  # L1/L2 offsets use bits 9..55

OUR_FEATURE_NAMES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 3, "compression type"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
]


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    extra_fields: bytes = b""  # v3 bytes after offset 105 up to header_length, preserved
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def ext(self, type_: int) -> bytes | None:
        for e in self.extensions:
            if e.type == type_:
                return e.data
        return None

    @property
    def backing_format(self) -> str | None:
        d = self.ext(EXT_BACKING_FORMAT)
        return d.decode("utf-8", "replace") if d is not None else None

    def feature_names(self) -> dict[tuple[int, int], str]:
        d = self.ext(EXT_FEATURE_TABLE) or b""
        names = {}
        for i in range(0, len(d) - 47, 48):
            kind, bit = d[i], d[i + 1]
            names[(kind, bit)] = d[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
        return names

    def pack_fixed(self) -> bytes:
        """The fixed header fields (72 bytes for v2, header_length for v3)."""
        out = V2_HEADER.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset,
        )
        if self.version >= 3:
            out += V3_FIELDS.pack(
                self.incompatible_features, self.compatible_features,
                self.autoclear_features, self.refcount_order, self.header_length,
            )
            if self.header_length > V3_HEADER_MIN:
                out += bytes([self.compression_type]) + self.extra_fields
        return out

    def pack_extensions(self) -> bytes:
        out = bytearray()
        for e in self.extensions:
            out += struct.pack(">II", e.type, len(e.data)) + e.data
            out += bytes(-len(e.data) % 8)
        out += bytes(8)  # end marker
        return bytes(out)


def pack_first_cluster(h: Header, cs: int) -> bytes:
    """The whole first cluster as it is to be written: the fixed fields, the
    extensions and the backing file name after them (backing_file_offset
    set to match), zero-padded to `cs`, so that no stale name or extension
    is left behind. Raises BlockError (and changes nothing) when it does
    not fit."""
    name = h.backing_file.encode("utf-8", "surrogateescape") if h.backing_file else b""
    old = (h.backing_file_offset, h.backing_file_size)
    head_len = len(h.pack_fixed()) + len(h.pack_extensions())
    h.backing_file_offset, h.backing_file_size = (head_len, len(name)) if name else (0, 0)
    buf = h.pack_fixed() + h.pack_extensions() + name
    if len(buf) > cs:
        h.backing_file_offset, h.backing_file_size = old
        raise BlockError("Cannot fit the image header, its extensions and the backing file name in one cluster")
    return buf + bytes(cs - len(buf))


def parse_header(buf: bytes, file_length: int) -> Header:
    """Parse and validate the first cluster (or as much as the file has)."""
    if len(buf) < V2_HEADER.size or buf[:4] != MAGIC:
        raise BlockError("Image is not in qcow2 format")
    f = V2_HEADER.unpack_from(buf)
    h = Header(*f[1:])
    if h.version not in (2, 3):
        raise BlockError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise BlockError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs = h.cluster_size
    if h.version >= 3:
        if len(buf) < V3_HEADER_MIN:
            raise BlockError("qcow2 header exceeds cluster size")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = V3_FIELDS.unpack_from(buf, 72)
        if h.header_length < V3_HEADER_MIN or h.header_length % 8:
            raise BlockError(f"qcow2 header too short or misaligned ({h.header_length})")
        if h.header_length > cs or h.header_length > len(buf):
            raise BlockError("qcow2 header exceeds cluster size")
        if h.header_length > V3_HEADER_MIN:
            h.compression_type = buf[104]
            h.extra_fields = bytes(buf[105 : h.header_length])
    else:
        h.header_length = 72
    if h.refcount_order > 6:
        raise BlockError("Reference count entry width too large; may not exceed 64 bits")

    # header extensions, between header_length and the end of the first cluster
    ext_end = min(cs, len(buf))
    if h.backing_file_offset:
        ext_end = min(ext_end, h.backing_file_offset)
    pos = h.header_length
    seen: set[int] = set()
    while pos + 8 <= ext_end:
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            break
        if elen > ext_end - pos:
            raise BlockError("Invalid qcow2 header extension: length exceeds the header area")
        if etype in seen and etype != 0:
            raise BlockError(f"Duplicate qcow2 header extension 0x{etype:08x}")
        seen.add(etype)
        h.extensions.append(Extension(etype, bytes(buf[pos : pos + elen])))
        pos += (elen + 7) & ~7

    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_offset > cs or \
                h.backing_file_offset + h.backing_file_size > min(cs, len(buf)):
            raise BlockError("Invalid backing file name in qcow2 header")
        raw = bytes(buf[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    return h


def unsupported_features(h: Header) -> list[str]:
    """Names of incompatible features this driver cannot handle (empty: ok)."""
    names = h.feature_names()
    out = []
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, f"method {h.crypt_method}")
        out.append(f"encryption ({kind})")
    bits = h.incompatible_features
    if bits & INCOMPAT_DATA_FILE:
        out.append(names.get((0, 2), "external data file"))
    if bits & INCOMPAT_EXTL2:
        out.append(names.get((0, 4), "extended L2 entries"))
    unknown = bits & ~(INCOMPAT_KNOWN | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)
    for bit in range(64):
        if unknown & (1 << bit):
            out.append(names.get((0, bit), f"Unknown incompatible feature: {1 << bit:x}"))
    if bits & INCOMPAT_COMPRESSION:
        if h.compression_type == COMPRESSION_ZLIB:
            out.append("compression type bit set with compression_type zlib")
        elif h.compression_type not in COMPRESSION_NAMES:
            out.append(f"compression type {h.compression_type}")
    elif h.compression_type != COMPRESSION_ZLIB:
        out.append("compression_type set without the compression type feature bit")
    return out


def feature_table_ext() -> Extension:
    data = b"".join(
        bytes([kind, bit]) + name.encode().ljust(46, b"\0") for kind, bit, name in OUR_FEATURE_NAMES
    )
    return Extension(EXT_FEATURE_TABLE, data)
