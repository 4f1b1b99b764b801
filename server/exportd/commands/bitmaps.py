"""QMP commands of the dirty bitmaps: block-dirty-bitmap-add, -remove,
-clear, -enable, -disable, -merge (each one transaction action: exportd.
block.bitmap_actions) and x-debug-block-dirty-bitmap-sha256."""

from __future__ import annotations

from typing import Any

from exportd.block import transaction
from exportd.block.bitmap_actions import ACTIONS, bitmap_of
from exportd.commands import command


def _one_action(kind: str) -> None:
    async def handler(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
        await transaction.run([ACTIONS[kind](daemon.graph, args)])
        return {}

    command(kind)(handler)


for _kind in ACTIONS:
    _one_action(_kind)


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": bitmap_of(daemon.graph, args["node"], args["name"]).bits.sha256()}
