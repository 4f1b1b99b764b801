"""QMP commands for user-created objects: object-add, object-del (exportd.objects),
and qom-list, qom-get, qom-set on them (exportd.qom)."""

from __future__ import annotations

from typing import Any

from exportd import qom
from exportd.commands import command
from exportd.objects import registry_of


@command("object-add")
async def object_add(daemon: Any, args: dict[str, Any]) -> None:
    await registry_of(daemon).add(args)


@command("object-del")
async def object_del(daemon: Any, args: dict[str, Any]) -> None:
    registry_of(daemon).delete(args["id"])


@command("qom-list")
async def qom_list(daemon: Any, args: dict[str, Any]) -> list[dict[str, str]]:
    return qom.qom_list(registry_of(daemon), args["path"])


@command("qom-get")
async def qom_get(daemon: Any, args: dict[str, Any]) -> Any:
    return qom.qom_get(registry_of(daemon), args["path"], args["property"])


@command("qom-set")
async def qom_set(daemon: Any, args: dict[str, Any]) -> None:
    qom.qom_set(registry_of(daemon), daemon.schema, args["path"], args["property"], args["value"])
