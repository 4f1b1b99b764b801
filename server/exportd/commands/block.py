"""QMP commands of the block layer: blockdev-add, blockdev-del,
query-named-block-nodes (daemon.graph is the exportd.block.graph.BlockGraph)."""

from __future__ import annotations

from typing import Any

from exportd.block.query import named_block_nodes
from exportd.commands import command


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
