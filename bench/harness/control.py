"""Control-plane figures over QMP: export add+del cycle time, memory per export.

A cycle is block-export-add, block-export-del, and the BLOCK_EXPORT_DELETED
event: only then is the export really gone (unmounted) and its id free again.
Memory is the daemon's VmRSS with 1 export and with N exports of one node;
the cost of one more export is (RSS_N - RSS_1) / (N - 1).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .qmp import QMP_TIMEOUT_S, connect


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ExportControl:
    """Adds and deletes FUSE exports of one node over one QMP connection."""

    def __init__(self, client, node_name: str) -> None:
        from qemu.qmp import EventListener

        self.client = client
        self.node_name = node_name
        self.deleted = EventListener(names=("BLOCK_EXPORT_DELETED",))
        client.register_listener(self.deleted)

    async def add(self, export_id: str, mountpoint: Path) -> None:
        await asyncio.wait_for(self.client.execute("block-export-add", {
            "type": "fuse", "id": export_id, "node-name": self.node_name,
            "mountpoint": str(mountpoint), "writable": False,
        }), QMP_TIMEOUT_S)

    async def delete(self, export_id: str) -> None:
        await asyncio.wait_for(self.client.execute("block-export-del", {"id": export_id}),
                               QMP_TIMEOUT_S)
        await asyncio.wait_for(self._deleted(export_id), QMP_TIMEOUT_S)

    async def _deleted(self, export_id: str) -> None:
        while True:
            event = await self.deleted.get()
            if event.get("data", {}).get("id") == export_id:
                return

    def close(self) -> None:
        self.client.remove_listener(self.deleted)


async def _session(socket_path: Path, node_name: str):
    client = await connect(socket_path)
    return client, ExportControl(client, node_name)


async def measure_cycles(socket_path: Path, node_name: str, mountpoint: Path, cycles: int) -> float:
    """Milliseconds per add+del cycle, after one untimed warm-up cycle."""
    client, control = await _session(socket_path, node_name)
    try:
        await control.add("cycle", mountpoint)
        await control.delete("cycle")
        start = time.perf_counter()
        for _ in range(cycles):
            await control.add("cycle", mountpoint)
            await control.delete("cycle")
        elapsed = time.perf_counter() - start
    finally:
        control.close()
        await client.disconnect()
    return elapsed * 1000.0 / cycles


async def measure_memory(socket_path: Path, node_name: str, pid: int, mount_dir: Path,
                         count: int) -> dict:
    """RSS with 0, 1 and count exports; deletes them all again afterwards."""
    mountpoints = []
    for i in range(count):
        m = mount_dir / f"mem{i:03d}.raw"
        m.touch()
        mountpoints.append(m)
    client, control = await _session(socket_path, node_name)
    added: list[str] = []
    try:
        await asyncio.sleep(0.2)
        rss = {"0": rss_kib(pid)}
        for i, m in enumerate(mountpoints):
            await control.add(f"mem{i}", m)
            added.append(f"mem{i}")
            if i == 0:
                await asyncio.sleep(0.2)
                rss["1"] = rss_kib(pid)
        await asyncio.sleep(0.2)
        rss[str(count)] = rss_kib(pid)
        for export_id in list(added):
            await control.delete(export_id)
            added.remove(export_id)
    finally:
        control.close()
        await client.disconnect()
    per_export = (rss[str(count)] - rss["1"]) / (count - 1)
    return {"rss_kib": rss, "exports": count, "per_export_kib": per_export}
