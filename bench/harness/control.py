"""Control-plane figures over QMP: export add+del cycle time, memory per export.

A cycle is block-export-add, block-export-del, and the BLOCK_EXPORT_DELETED
event: only then is the export really gone (unmounted) and its id free again.
Memory is the daemon's VmRSS with 1 export and with N exports of one node;
the cost of one more export is (RSS_N - RSS_1) / (N - 1), measured idle
(right after the mounts) and again after one 1 MiB write and read on every
export, so that per-export buffers touched only by I/O show up.
"""

from __future__ import annotations

import asyncio
import mmap
import os
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

    async def add(self, export_id: str, mountpoint: Path, writable: bool = False) -> None:
        await asyncio.wait_for(self.client.execute("block-export-add", {
            "type": "fuse", "id": export_id, "node-name": self.node_name,
            "mountpoint": str(mountpoint), "writable": writable,
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


TOUCH_SIZE = 1024 * 1024


def touch_export(mountpoint: Path) -> None:
    """One 1 MiB O_DIRECT write and read: buffers a server allocates or
    faults in lazily, per export, become resident. Runs in the harness
    process, never in the daemon measured."""
    buf = mmap.mmap(-1, TOUCH_SIZE)  # page-aligned, as O_DIRECT wants
    buf.write(b"\xa5" * TOUCH_SIZE)
    fd = os.open(mountpoint, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], 0)
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
        buf.close()


async def _settled_rss(pid: int) -> int:
    await asyncio.sleep(0.2)
    return rss_kib(pid)


async def measure_memory(socket_path: Path, node_name: str, pid: int, mount_dir: Path,
                         count: int) -> dict:
    """RSS with 0, 1 and count exports, idle and after one 1 MiB write and
    read on each export; deletes the exports again afterwards."""
    mountpoints = []
    for i in range(count):
        m = mount_dir / f"mem{i:03d}.raw"
        m.touch()
        mountpoints.append(m)
    client, control = await _session(socket_path, node_name)
    added: list[str] = []
    try:
        rss = {"0": await _settled_rss(pid)}
        for i, m in enumerate(mountpoints):
            await control.add(f"mem{i}", m, writable=True)
            added.append(f"mem{i}")
            if i == 0:
                rss["1"] = await _settled_rss(pid)
                await asyncio.wait_for(asyncio.to_thread(touch_export, m), QMP_TIMEOUT_S)
                rss["1-after-io"] = await _settled_rss(pid)
        rss[str(count)] = await _settled_rss(pid)
        for m in mountpoints[1:]:
            await asyncio.wait_for(asyncio.to_thread(touch_export, m), QMP_TIMEOUT_S)
        rss[f"{count}-after-io"] = await _settled_rss(pid)
        for export_id in list(added):
            await control.delete(export_id)
            added.remove(export_id)
    finally:
        control.close()
        await client.disconnect()
    return {
        "rss_kib": rss,
        "exports": count,
        "per_export_kib": (rss[str(count)] - rss["1"]) / (count - 1),
        "per_export_after_io_kib": (rss[f"{count}-after-io"] - rss["1-after-io"]) / (count - 1),
    }
