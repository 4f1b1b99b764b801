"""Control commands: qmp_capabilities, query-version, query-commands, query-qmp-schema, quit."""

from __future__ import annotations

from typing import Any

from exportd.commands import COMMANDS, command
from exportd.errors import QMPError
from exportd.qapi.introspect import schema_info

# Capabilities exportd offers in its greeting (QEMU offers "oob"; exportd
# has no out-of-band execution) and accepts in qmp_capabilities.
OFFERED_CAPABILITIES: tuple[str, ...] = ()


@command("qmp_capabilities", allowed_in_negotiation=True)
async def qmp_capabilities(daemon: Any, args: dict[str, Any]) -> None:
    for cap in args.get("enable", []):
        if cap not in OFFERED_CAPABILITIES:
            raise QMPError(f"Capability {cap} not available")
    # the session leaves negotiation mode when this returns


@command("query-version")
async def query_version(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    return daemon.version_info()


@command("query-commands")
async def query_commands(daemon: Any, args: dict[str, Any]) -> list[dict[str, str]]:
    # only what is implemented: clients probe this to decide what to use
    return [{"name": name} for name in sorted(COMMANDS)]


@command("query-qmp-schema")
async def query_qmp_schema(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    return schema_info(daemon.schema, sorted(COMMANDS), sorted(daemon.schema.events))


@command("quit")
async def quit_(daemon: Any, args: dict[str, Any]) -> None:
    # the reply is queued before the shutdown task gets to run
    daemon.request_shutdown("host-qmp-quit")
