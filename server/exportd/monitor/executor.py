"""What a QMP session needs from whoever runs its commands (the daemon).

The monitor depends on this interface, not on exportd.daemon, so the
daemon can own its monitors without the two importing each other. Events
travel the other way: the owner hands each one to Monitor.broadcast, which
queues it on every negotiated session.
"""

from __future__ import annotations

from typing import Any, Protocol


class CommandExecutor(Protocol):
    def greeting(self) -> dict[str, Any]:
        """The {"QMP": {"version": ..., "capabilities": [...]}} a client gets on connecting."""
        ...

    def check_arguments(self, name: str, args: dict[str, Any]) -> None:
        """Validate a command's arguments only; raise QMPError with QEMU's text."""
        ...

    async def execute(self, name: str, args: dict[str, Any]) -> Any:
        """Validate and run one command; its result (None means {}) or QMPError."""
        ...
