"""qcow2 format driver (blockdev-add driver=qcow2), written from the published
format spec (docs/interop/qcow2.txt in qemu/qemu).

Modules, split as QEMU splits qcow2: node.py (the node: open, reads, writes,
zeroing, discard, resize, block status, introspection, the driver table;
qcow2.c), cluster.py (the one mapping function and cluster allocation;
qcow2-cluster.c), writeback.py (crash-safe write-back order), refcount.py
(+ refcount_codec.py: refcount table/blocks, allocation, table growth;
qcow2-refcount.c) behind imagefile.py (the narrow image file interface),
l2cache.py (decoded L2 tables, LRU; qcow2-cache.c), snapshots.py (the
snapshot table; qcow2-snapshot.c), header.py (header, extensions, feature
checks), compress.py (deflate, zstd), compressed_write.py (compressed
cluster writes, packed at byte granularity as QEMU does; qcow2-cluster.c's
qcow2_alloc_compressed_cluster_offset), create.py (new images).

Supported: versions 2 and 3; cluster sizes 512 B - 2 MiB; refcount widths
1 - 64 bits; header extensions read and kept byte for byte; zero clusters;
compressed clusters (zlib, zstd with the `zstandard` package), read and
written (whole clusters not yet allocated: a backup's `compress`); backing chains
(header default, node name, nested dict, null); internal snapshots kept intact
(COPIED rule, L2 and data copy-on-write); write zeroes with the zero flag;
discard (with pass-discard-request); grow (L1 and refcount table growth, with
preallocation) and loss-free shrink; persistent dirty bitmaps (bitmaps.py:
the bitmaps extension loaded at open, marked in use while writable, stored
at close and reopen to read-only).

Refused with a message naming the feature: encryption, external data files,
extended L2 entries, unknown incompatible bits; a corrupt-flagged image opens
read-only only; a dirty (lazy refcounts, not repaired here) image opens
read-only only. Lazy refcounts are never used for writing (refcounts are
always kept exact), so the dirty bit is never set.
"""

from exportd.block.qcow2.node import Qcow2Node

__all__ = ["Qcow2Node"]
