"""The block-dirty-bitmap-* commands as transaction actions (QEMU's
block_dirty_bitmap_*_prepare/commit/abort in blockdev.c). A single command
is a transaction of one action, so both take the same checks and texts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exportd.block import bitmaps
from exportd.block.bitmaps import DirtyBitmap, Use
from exportd.block.dirtymap import DirtyMap
from exportd.block.node import BlockNode
from exportd.block.transaction import Action
from exportd.errors import BlockError

if TYPE_CHECKING:
    from exportd.block.graph import BlockGraph


def node_of(graph: BlockGraph, name: str) -> BlockNode:
    """QEMU's bdrv_lookup_bs(node, node) for the bitmap commands."""
    node = graph.find(name)
    if node is None:
        raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def bitmap_of(graph: BlockGraph, node: str, name: str) -> DirtyBitmap:
    """QEMU's block_dirty_bitmap_lookup."""
    found = graph.find(node)
    if found is None:
        raise BlockError(f"Node '{node}' not found")
    return bitmaps.lookup(found, name)


class _BitmapAction(Action):
    def __init__(self, graph: BlockGraph, data: dict[str, Any]) -> None:
        self.graph = graph
        self.data = data
        self.bitmap: DirtyBitmap | None = None


class AddAction(_BitmapAction):
    kind = "block-dirty-bitmap-add"

    async def prepare(self) -> None:
        d = self.data
        node = node_of(self.graph, d["node"])
        bm = bitmaps.create(node, d["name"], d.get("granularity"), persistent=d.get("persistent", False),
                            disabled=d.get("disabled", False))
        if bm.enabled:
            bitmaps.check_can_record(node)
        bitmaps.attach(bm)
        self.bitmap = bm

    async def abort(self) -> None:
        if self.bitmap is not None:
            bitmaps.detach(self.bitmap)


class RemoveAction(_BitmapAction):
    """The bitmap is busy (and off the image) from prepare on, and only
    goes at commit; an abort keeps it, and a persistent one is stored again
    when the image is."""

    kind = "block-dirty-bitmap-remove"

    async def prepare(self) -> None:
        bm = bitmap_of(self.graph, self.data["node"], self.data["name"])
        bm.check(Use.BUSY | Use.READONLY)
        if bm.persistent:
            await bm.node.remove_persistent_bitmap(bm.name)
        bm.busy = True
        self.bitmap = bm

    def commit(self) -> None:
        assert self.bitmap is not None
        self.bitmap.busy = False
        bitmaps.detach(self.bitmap)

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False


class _ChangeBitsAction(_BitmapAction):
    """clear and merge: the old bits are kept for an abort."""

    def __init__(self, graph: BlockGraph, data: dict[str, Any]) -> None:
        super().__init__(graph, data)
        self.backup: DirtyMap | None = None

    async def abort(self) -> None:
        if self.bitmap is not None and self.backup is not None:
            self.bitmap.bits.restore(self.backup)


class ClearAction(_ChangeBitsAction):
    kind = "block-dirty-bitmap-clear"

    async def prepare(self) -> None:
        bm = bitmap_of(self.graph, self.data["node"], self.data["name"])
        bm.check(Use.DEFAULT)
        self.bitmap, self.backup = bm, bm.bits.copy()
        bm.bits.clear()


class MergeAction(_ChangeBitsAction):
    """Sources are merged into a copy first, so a failing source (unknown,
    inconsistent, another size) leaves the target as it was."""

    kind = "block-dirty-bitmap-merge"

    async def prepare(self) -> None:
        d = self.data
        target = bitmap_of(self.graph, d["node"], d["target"])
        merged = target.bits.copy()
        for src in d["bitmaps"]:
            if isinstance(src, str):
                source = bitmap_of(self.graph, d["node"], src)
            else:
                source = bitmap_of(self.graph, src["node"], src["name"])
            bitmaps.check_merge_source(target, source)
            merged.merge(source.bits)
        bitmaps.check_merge_target(target)
        self.bitmap, self.backup = target, target.bits.copy()
        target.bits.restore(merged)


class _SwitchAction(_BitmapAction):
    """enable and disable."""

    enable: bool

    def __init__(self, graph: BlockGraph, data: dict[str, Any]) -> None:
        super().__init__(graph, data)
        self.was_enabled = False

    async def prepare(self) -> None:
        bm = bitmap_of(self.graph, self.data["node"], self.data["name"])
        bm.check(Use.ALLOW_RO)
        if self.enable and not bm.enabled:
            bitmaps.check_can_record(bm.node)
        self.bitmap, self.was_enabled = bm, bm.enabled
        bm.enabled = self.enable

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.enabled = self.was_enabled


class EnableAction(_SwitchAction):
    kind = "block-dirty-bitmap-enable"
    enable = True


class DisableAction(_SwitchAction):
    kind = "block-dirty-bitmap-disable"
    enable = False


ACTIONS: dict[str, type[_BitmapAction]] = {
    a.kind: a for a in (AddAction, RemoveAction, ClearAction, MergeAction, EnableAction, DisableAction)
}
