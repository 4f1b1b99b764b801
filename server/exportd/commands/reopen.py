"""QMP blockdev-reopen (daemon.graph is the exportd.block.graph.BlockGraph;
the work is exportd.block.reopen.reopen_many)."""

from __future__ import annotations

from typing import Any

from exportd.block.reopen import reopen_many
from exportd.commands import command


@command("blockdev-reopen")
async def blockdev_reopen(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await reopen_many(daemon.graph, args["options"])
    return {}
