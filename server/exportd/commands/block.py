"""QMP commands of the block layer: blockdev-add, blockdev-del,
query-named-block-nodes, block_resize, blockdev-snapshot,
blockdev-snapshot-sync, block-set-write-threshold (daemon.graph is the
exportd.block.graph.BlockGraph)."""

from __future__ import annotations

from typing import Any

from exportd.block.graph import check_not_busy
from exportd.block.query import named_block_nodes
from exportd.block.write_threshold import set_threshold
from exportd.commands import command
from exportd.errors import BlockError


@command("blockdev-add")
async def blockdev_add(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.add(args)
    return {}


@command("blockdev-del")
async def blockdev_del(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.delete(args["node-name"])
    return {}


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    return await named_block_nodes(daemon.graph.nodes(), flat=bool(args.get("flat", False)))


@command("block_resize")
async def block_resize(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    # QEMU looks `device` up among named BlockBackends first; a storage
    # daemon has none, so only node-name can find a node (as in qsd)
    device, node_name = args.get("device"), args.get("node-name")
    node = daemon.graph.find(node_name) if node_name is not None else None
    if node is None:
        raise BlockError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    size = args["size"]
    if size < 0:
        raise BlockError("Parameter 'size' expects a >0 size")
    try:
        check_not_busy(node)  # a backing node, or one a block job holds
    except BlockError:
        raise BlockError(f"Device '{device if device is not None else '(null)'}' is in use") from None
    await daemon.graph.resize(node, size)
    return {}


@command("blockdev-snapshot")
async def blockdev_snapshot(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.snapshot(args["node"], args["overlay"])
    return {}


@command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.snapshot_sync(
        args.get("device"), args.get("node-name"), args["snapshot-file"],
        args.get("snapshot-node-name"), args.get("format", "qcow2"), args.get("mode", "absolute-paths"),
    )
    return {}


@command("block-set-write-threshold")
async def block_set_write_threshold(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    name = args["node-name"]
    node = daemon.graph.find(name)
    if node is None:
        raise BlockError(f"Device '{name}' not found")
    set_threshold(node, args["write-threshold"], daemon.emit_event)
    return {}
