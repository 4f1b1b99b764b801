"""QMP commands for block exports: block-export-add, block-export-del,
query-block-exports. The work is in exportd.export.table.ExportTable."""

from __future__ import annotations

from typing import Any

from exportd.commands import command


@command("block-export-add")
async def block_export_add(daemon: Any, args: dict[str, Any]) -> None:
    await daemon.exports.add(args)
    return None


@command("block-export-del")
async def block_export_del(daemon: Any, args: dict[str, Any]) -> None:
    exp = daemon.exports.delete(args["id"], args.get("mode", "safe"))
    if exp.refcount == 0:
        # nothing was in flight: the deletion runs now, and as in
        # qemu-storage-daemon it is over (unmounted, node released,
        # BLOCK_EXPORT_DELETED sent) before the reply, so a blockdev-del
        # sent right after finds the node free
        await exp.wait_deleted()
    return None


@command("query-block-exports")
async def query_block_exports(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.exports.query()
