"""QMP commands about the graph as a whole: transaction (several graph
changes all or nothing), x-debug-query-block-graph and query-block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exportd.block import bitmap_actions, transaction
from exportd.block.graph_query import block_graph
from exportd.block.snapshot import SnapshotAction, SnapshotSyncAction
from exportd.commands import backup, command

# TransactionActionKind -> the action built from (graph, data). A new kind
# is one entry here plus its enum value and
# wrapper in schema/commands/transaction.json.
ACTIONS: dict[str, Callable[[Any, dict[str, Any]], transaction.Action]] = {
    "abort": lambda graph, data: transaction.AbortAction(),
    "blockdev-snapshot": SnapshotAction,
    "blockdev-snapshot-sync": SnapshotSyncAction,
    **bitmap_actions.ACTIONS,
    **backup.ACTIONS,
}


@command("transaction")
async def transaction_(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    actions = [ACTIONS[a["type"]](daemon.graph, a["data"]) for a in args["actions"]]
    mode = args.get("properties", {}).get("completion-mode", "individual")
    await transaction.run(actions, completion_mode=mode)
    return {}


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    return block_graph(daemon.graph.nodes(), list(reversed(list(daemon.exports))))


@command("query-block")
async def query_block(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    # only named BlockBackends are listed; a storage daemon's are all
    # anonymous (exports, jobs), so qemu-storage-daemon answers [] as well
    return []
