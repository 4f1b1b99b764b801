"""QMP commands for user-created objects: object-add, object-del (exportd.objects)."""

from __future__ import annotations

from typing import Any

from exportd.commands import command
from exportd.objects import registry_of


@command("object-add")
async def object_add(daemon: Any, args: dict[str, Any]) -> None:
    await registry_of(daemon).add(args)


@command("object-del")
async def object_del(daemon: Any, args: dict[str, Any]) -> None:
    registry_of(daemon).delete(args["id"])
