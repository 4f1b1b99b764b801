"""An in-process ExportTable and BlockGraph with real FUSE mounts (no daemon,
no QMP): what the export life-cycle tests drive directly.

The host object is only what the table needs from exportd's Daemon (`graph`
and `emit_event`), so that a test can hold a reference the way a request in
flight does and look at every phase deterministically. All I/O on the mounts
happens in worker threads, never on the loop that serves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exportd.block.graph import BlockGraph
from exportd.export.table import ExportTable
from tests.support.threads import athread


class Host:
    """The two things an ExportTable uses of the daemon."""

    def __init__(self) -> None:
        self.graph = BlockGraph(self)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.on_event = None
        self.exports = ExportTable(self)

    def emit_event(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, data)
        self.events.append((name, data))


async def add(h: Host, workdir: Path, export_id: str, node: str = "null0", **opts: Any):  # noqa: ANN201
    """A FUSE export `export_id` of `node` on workdir/<export_id>.raw."""
    mnt = workdir / f"{export_id}.raw"
    # in a thread: the path may already be one of this loop's own mounts
    await athread(lambda: mnt.exists() or mnt.touch())
    return await h.exports.add(
        {"type": "fuse", "id": export_id, "node-name": node, "mountpoint": str(mnt), **opts}
    )
