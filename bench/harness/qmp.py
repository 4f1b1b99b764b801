"""Small QMP helpers on qemu.qmp (a real QMP client nobody here wrote)."""

from __future__ import annotations

import asyncio
from pathlib import Path

QMP_TIMEOUT_S = 30.0


async def connect(socket_path: Path):
    from qemu.qmp import QMPClient  # test/bench dependency, imported only when used

    client = QMPClient("exportd-bench")
    await asyncio.wait_for(client.connect(str(socket_path)), QMP_TIMEOUT_S)
    return client


async def qmp_execute(socket_path: Path, command: str, arguments: dict | None = None) -> object:
    client = await connect(socket_path)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), QMP_TIMEOUT_S)
    finally:
        await client.disconnect()
