"""External snapshots as transaction actions (QEMU's external_snapshot_*
steps for blockdev-snapshot and blockdev-snapshot-sync).

prepare() does what the one-step commands did, checks and error texts in
QEMU's order, and leaves the overlay on top (so a later action of the same
transaction sees it); abort() puts every parent back on the old node and
drops the overlay's backing edge; clean() closes an overlay that
snapshot-sync opened and nothing took over (also after an abort: the image
file it created stays, as in QEMU). commit() has nothing to do: QEMU also
reopens the old node read-only there, which exportd does not (a node's
read-only flag is fixed at open).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from exportd.aio.threads import in_own_thread
from exportd.block.node import BlockNode, Edge, Perm
from exportd.block.transaction import Action
from exportd.errors import BlockError

if TYPE_CHECKING:
    from exportd.block.graph import BlockGraph

log = logging.getLogger(__name__)


class _ExternalSnapshot(Action):
    """What both snapshot actions share: the overlay put on top of a node."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.node: BlockNode | None = None
        self.overlay: BlockNode | None = None
        self.backing_edge: Edge | None = None  # set once the overlay is appended

    async def _check_node(self, node: BlockNode) -> None:
        from exportd.block.graph import check_not_busy

        check_not_busy(node)
        if not node.read_only:
            await node.flush()  # what the snapshot freezes is on disk

    def _append(self, node: BlockNode, overlay: BlockNode) -> None:
        """QEMU's checks on the overlay, then bdrv_append: `overlay` over `node`."""
        if overlay.combined_perm()[0] & Perm.CONSISTENT_READ:
            # its users would see the image change under them (a parent that
            # only writes, as a mirror target does, may stay)
            raise BlockError("The overlay is already in use")
        if overlay.child("backing") is not None:
            raise BlockError("The overlay already has a backing image")
        if not type(overlay).supports_backing:
            raise BlockError("The overlay does not support backing images")
        edge = node.attach(overlay, Perm.CONSISTENT_READ, Perm.ALL, "backing")
        overlay.child_edges["backing"] = edge
        try:
            self.graph.replace_node(node, overlay)
        except BaseException:
            del overlay.child_edges["backing"]
            node.detach(edge)
            raise
        self.backing_edge = edge

    async def abort(self) -> None:
        node, overlay, edge = self.node, self.overlay, self.backing_edge
        if node is None or overlay is None or edge is None:
            return  # prepare() stopped before the overlay went on top
        self.backing_edge = None
        # drop the backing edge first, so that `node` is no longer below the
        # overlay and every parent can move back to it
        if overlay.child_edges.get("backing") is edge:
            del overlay.child_edges["backing"]
        node.detach(edge)
        try:
            self.graph.replace_node(overlay, node)
        except Exception:
            # QEMU asserts this cannot fail: the parents were there a moment ago
            log.exception("moving the parents of %s back to %s failed", overlay.node_name, node.node_name)


class SnapshotAction(_ExternalSnapshot):
    """blockdev-snapshot: `overlay` (an existing node) on top of `node`."""

    kind = "blockdev-snapshot"

    def __init__(self, graph: BlockGraph, data: dict[str, Any]) -> None:
        super().__init__(graph)
        self.node_name: str = data["node"]
        self.overlay_name: str = data["overlay"]

    async def prepare(self) -> None:
        node = self.graph._lookup(self.node_name)
        await self._check_node(node)
        overlay = self.graph._lookup(self.overlay_name)
        self.node = node
        self._append(node, overlay)
        self.overlay = overlay


class SnapshotSyncAction(_ExternalSnapshot):
    """blockdev-snapshot-sync: the overlay image is created (mode
    absolute-paths: its backing file the node's file name, in the node's
    format) or taken as it is (existing), opened without its backing chain
    and owned by its parents (QEMU's implicit overlay), then put on top."""

    kind = "blockdev-snapshot-sync"

    def __init__(self, graph: BlockGraph, data: dict[str, Any]) -> None:
        super().__init__(graph)
        self.device: str | None = data.get("device")
        self.node_name: str | None = data.get("node-name")
        self.snapshot_file: str = data["snapshot-file"]
        self.snapshot_node_name: str | None = data.get("snapshot-node-name")
        self.format: str = data.get("format", "qcow2")
        self.mode: str = data.get("mode", "absolute-paths")
        self.opened: BlockNode | None = None  # the overlay this action opened

    async def prepare(self) -> None:
        graph = self.graph
        # a storage daemon has no named devices: only node-name finds a node
        node = graph.find(self.node_name) if self.node_name is not None else None
        if node is None:
            raise BlockError(f"Cannot find device='{self.device or ''}' nor node-name='{self.node_name or ''}'")
        await self._check_node(node)
        if self.node_name is not None and self.snapshot_node_name is None:
            raise BlockError("New overlay node-name missing")
        if self.snapshot_node_name is not None and self.snapshot_node_name in graph:
            raise BlockError("New overlay node-name already in use")
        if self.mode != "existing":
            from exportd.block.mkimage import create_image

            await in_own_thread(create_image, self.snapshot_file, node.getlength(), self.format,
                                backing=node.filename(), backing_fmt=node.driver)
        options: dict[str, Any] = {"driver": self.format, "backing": None,
                                   "file": {"driver": "file", "filename": self.snapshot_file}}
        if self.snapshot_node_name is not None:
            options["node-name"] = self.snapshot_node_name
        overlay = await graph._open(options)  # owned by its parents, as QEMU's
        self.node, self.opened = node, overlay
        self._append(node, overlay)
        self.overlay = overlay

    async def clean(self) -> None:
        overlay = self.opened
        self.opened = None
        if overlay is not None and overlay.refcount == 0 and graph_has(self.graph, overlay):
            # nothing moved to it (the node had no users, or the run was
            # rolled back): as in QEMU, it goes with the command's reference
            await self.graph._destroy(overlay)


def graph_has(graph: BlockGraph, node: BlockNode) -> bool:
    return graph.find(node.node_name) is node
