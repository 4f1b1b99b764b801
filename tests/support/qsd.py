"""qemu-storage-daemon as the differential tests' reference (Debian's, an
oracle only): start it on a QMP socket, stopped by pid afterwards."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

QSD = shutil.which("qemu-storage-daemon")


@asynccontextmanager
async def running_qsd(socket_path: str, *args: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """qemu-storage-daemon with a QMP monitor on `socket_path` (and `args`),
    ready once the socket exists; terminated when the block ends."""
    assert QSD is not None, "qemu-storage-daemon is not installed"
    proc = subprocess.Popen([QSD, "--chardev", f"socket,id=m,path={socket_path},server=on,wait=off",
                             "--monitor", "chardev=m", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if Path(socket_path).exists():
                break
            if proc.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited with status {proc.returncode} at start")
            await asyncio.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)
