"""QMP commands of the NBD server: nbd-server-start, nbd-server-stop, and
the deprecated nbd-server-add / nbd-server-remove (thin aliases of
block-export-add type=nbd / block-export-del). The work is in
exportd.nbd.server and exportd.export.nbd."""

from __future__ import annotations

from typing import Any

from exportd.commands import command
from exportd.errors import QMPError
from exportd.nbd.server import server_of, start_server, stop_server


@command("nbd-server-start")
async def nbd_server_start(daemon: Any, args: dict[str, Any]) -> None:
    await start_server(daemon, args)


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Any, args: dict[str, Any]) -> None:
    await stop_server(daemon)


@command("nbd-server-add")
async def nbd_server_add(daemon: Any, args: dict[str, Any]) -> None:
    if server_of(daemon) is None:
        raise QMPError("NBD server not running")
    name = args.get("name", args["device"])
    options: dict[str, Any] = {"type": "nbd", "id": name, "node-name": args["device"], "name": name,
                               "writable": args.get("writable", False)}
    for key in ("description", "allocation-depth"):
        if key in args:
            options[key] = args[key]
    if "bitmap" in args:
        options["bitmaps"] = [args["bitmap"]]
    await daemon.exports.add(options)


@command("nbd-server-remove")
async def nbd_server_remove(daemon: Any, args: dict[str, Any]) -> None:
    server = server_of(daemon)
    if server is None:
        raise QMPError("NBD server not running")
    name = args["name"]
    exp = server.exports.get(name)
    if exp is None:
        raise QMPError(f"Export '{name}' is not found")
    daemon.exports.delete(exp.id, args.get("mode", "safe"))
