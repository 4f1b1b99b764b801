"""Dirty bitmaps (QEMU's BdrvDirtyBitmap): named records, per node, of
which chunks were written since a checkpoint, the base of incremental
backups.

A node keeps its bitmaps in `node.dirty_bitmaps`, newest first (QEMU's
order in query-named-block-nodes). Every write that reaches a node marks
its recording bitmaps: BlockNode.__init_subclass__ wraps each driver's
write, write_zeroes, discard, truncate and the write side of map_now with
`mark_written`, so no write path (FUSE, NBD, jobs, the in-place fast path)
can miss it. A persistent bitmap is stored by the node's driver (qcow2's
bitmaps extension); the node's hooks `check_can_store_bitmap` and
`remove_persistent_bitmap` are the driver's part.

The checks and texts are QEMU's (block/dirty-bitmap.c,
block/monitor/bitmap-qmp-cmds.c)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from exportd.block.dirtymap import DirtyMap
from exportd.errors import BlockError

if TYPE_CHECKING:
    from exportd.block.node import BlockNode

MAX_NAME = 1023  # BDRV_BITMAP_MAX_NAME_SIZE
DEFAULT_GRANULARITY = 65536


class Use(enum.IntFlag):
    """What a command is about to do with a bitmap (QEMU's BDRV_BITMAP_*):
    the states that forbid it."""

    BUSY = 1
    READONLY = 2
    INCONSISTENT = 4
    DEFAULT = BUSY | READONLY | INCONSISTENT  # change its bits
    ALLOW_RO = BUSY | INCONSISTENT  # enable, disable


class DirtyBitmap:
    def __init__(self, node: BlockNode, name: str, granularity: int, *, persistent: bool = False,
                 enabled: bool = True) -> None:
        self.node = node
        self.name = name
        self.bits = DirtyMap(node.getlength(), granularity)
        self.persistent = persistent
        self.enabled = enabled  # records writes
        self.busy = False  # a backup job or an NBD export uses it
        self.readonly = False  # loaded from an image opened read-only
        self.inconsistent = False  # found IN_USE in an image: not trusted

    @property
    def granularity(self) -> int:
        return self.bits.granularity

    def count(self) -> int:
        """Dirty bytes, whole chunks (QEMU counts the last one whole too)."""
        return self.bits.dirty_bytes()

    def check(self, use: Use) -> None:
        if use & Use.BUSY and self.busy:
            raise BlockError(f"Bitmap '{self.name}' is currently in use by another operation and cannot be used")
        if use & Use.READONLY and self.readonly:
            raise BlockError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if use & Use.INCONSISTENT and self.inconsistent:
            raise BlockError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, Any]:
        """One BlockDirtyInfo of query-named-block-nodes."""
        info: dict[str, Any] = {"name": self.name, "recording": self.enabled, "persistent": self.persistent,
                                "busy": self.busy, "granularity": self.granularity, "count": self.count()}
        if self.inconsistent:
            info["inconsistent"] = True
        return info


# --- the write paths ------------------------------------------------------------
def mark_written(node: BlockNode, offset: int, length: int) -> None:
    for bm in node.dirty_bitmaps:
        if bm.enabled:
            bm.bits.mark(offset, length)


def node_resized(node: BlockNode, old: int, new: int) -> None:
    """Every bitmap follows the node's size; growth counts as written (the
    new range reads zeroes where a backup may hold old data: QEMU leaves it
    clean)."""
    for bm in node.dirty_bitmaps:
        bm.bits.resize(new)
    if new > old:
        mark_written(node, old, new - old)


def recording_below(node: BlockNode) -> str | None:
    """The name of a node at or below `node` whose bitmaps record writes
    (the kernel must not write there behind the daemon's back), or None."""
    from exportd.block.graph import subtree

    for n in subtree(node):
        if any(bm.enabled for bm in n.dirty_bitmaps):
            return n.node_name
    return None


def check_can_record(node: BlockNode) -> None:
    """Refuse to let a bitmap of `node` start recording while a parent above
    it lets writes bypass the daemon (files open by FUSE passthrough): the
    bitmap would silently miss them and an incremental backup lose data."""
    from exportd.block.graph import users_above

    for parent in users_above(node):
        refuse = getattr(parent, "refuse_recording", None)
        if refuse is not None and (reason := refuse(node.node_name)):
            raise BlockError(reason)


# --- lookup and the commands' steps ------------------------------------------------
def find(node: BlockNode, name: str) -> DirtyBitmap | None:
    for bm in node.dirty_bitmaps:
        if bm.name == name:
            return bm
    return None


def lookup(node: BlockNode, name: str) -> DirtyBitmap:
    bm = find(node, name)
    if bm is None:
        raise BlockError(f"Dirty bitmap '{name}' not found")
    return bm


def default_granularity(node: BlockNode) -> int:
    """The node's cluster size, 4 KiB to 64 KiB; 64 KiB without clusters."""
    cluster = node.cluster_size()
    return min(max(cluster, 4096), 65536) if cluster > 0 else DEFAULT_GRANULARITY


def create(node: BlockNode, name: str, granularity: int | None = None, *, persistent: bool = False,
           disabled: bool = False) -> DirtyBitmap:
    """block-dirty-bitmap-add's checks, in QEMU's order, then the bitmap
    (not yet on the node: `attach` puts it there)."""
    if not name:
        raise BlockError("Bitmap name cannot be empty")
    if len(name.encode()) > MAX_NAME:
        raise BlockError(f"Bitmap name too long: {name}")
    if granularity is None:
        granularity = default_granularity(node)
    elif granularity < 512 or granularity & (granularity - 1):
        raise BlockError("Granularity must be power of 2 and at least 512")
    if persistent:
        node.check_can_store_bitmap(name, granularity)
    if find(node, name) is not None:
        raise BlockError(f"Bitmap already exists: {name}")
    return DirtyBitmap(node, name, granularity, persistent=persistent, enabled=not disabled)


def attach(bm: DirtyBitmap) -> None:
    bm.node.dirty_bitmaps.insert(0, bm)


def detach(bm: DirtyBitmap) -> None:
    bm.node.dirty_bitmaps.remove(bm)


def check_merge_source(target: DirtyBitmap, source: DirtyBitmap) -> None:
    """A source QEMU merges (into an anonymous copy of the target first: the
    target's own state is checked after every source, check_merge_target)."""
    source.check(Use.INCONSISTENT)
    if target.bits.length != source.bits.length:
        raise BlockError(f"Bitmaps are of different sizes (destination size is {target.bits.length}, "
                         f"source size is {source.bits.length}) and can't be merged")


def check_merge_target(target: DirtyBitmap) -> None:
    target.check(Use.DEFAULT)
