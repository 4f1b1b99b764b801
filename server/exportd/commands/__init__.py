"""The command table: every QMP command is an async handler registered here.

A handler takes the daemon (exportd.daemon.Daemon) and the arguments that
exportd.qapi.schema already validated against schema/commands/<name>.json,
and returns the JSON value of the reply's "return" (None means {}). It
raises exportd.errors.QMPError for failures. Modules register at import
time; load_all() imports every command family (FAMILIES).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    allowed_in_negotiation: bool = False


COMMANDS: dict[str, Command] = {}

FAMILIES = ("control", "block", "export", "jobs", "blockjobs", "reopen", "transaction", "objects", "nbd",
            "bitmaps", "backup", "fds")


def command(name: str, *, allowed_in_negotiation: bool = False) -> Callable[[Handler], Handler]:
    """Register an async handler for the QMP command `name`."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, allowed_in_negotiation)
        return handler

    return register


def load_all() -> dict[str, Command]:
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
    return COMMANDS
