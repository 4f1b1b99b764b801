"""qemu-storage-daemon as the differential tests' reference (Debian's, an
oracle only): start it on a QMP socket, stopped by pid afterwards; and
replies_of(), which plays the same QMP script against either daemon."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

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


async def replies_of(socket_path: str, steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Each step's reply: {"return": ...} or {"error": [class, desc]}."""
    client = QMPClient("differential")
    await client.connect(socket_path)
    replies: list[Any] = []
    try:
        for name, args in steps:
            try:
                replies.append({"return": await client.execute(name, args)})
            except ExecuteError as e:
                replies.append({"error": [e.error.error.class_, e.error.error.desc]})
    finally:
        await client.disconnect()
    return replies


async def replies_of_both(tmp_path: Path, fresh: Callable[[], None], steps: list[tuple[str, dict[str, Any]]],
                          ours: Callable[[], str]) -> tuple[list[Any], list[Any]]:
    """(exportd's replies, qemu-storage-daemon's) to the same script, each
    daemon on images just made by `fresh`; `ours()` starts exportd and
    returns its socket."""
    fresh()
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
    fresh()
    return await replies_of(ours(), steps), theirs


async def play_on_both(tmp_path: Path, start_exportd: Callable[[], Any], prepare: Callable[[Path], None],
                       script: Callable[[Path, dict[str, Any]], list[Any]]) -> dict[str, Any]:
    """The same jobflow script against qemu-storage-daemon and exportd, each
    in its own directory made by `prepare` (tmp_path/qsd, tmp_path/exportd);
    `script(directory, out)` may record outside findings in `out`.
    Returns {"qsd": ..., "exportd": ...}, each (replies, events, out)."""
    from tests.support.jobflow import play

    results: dict[str, Any] = {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        work.mkdir()
        prepare(work)
        out: dict[str, Any] = {}
        if who == "qsd":
            async with running_qsd(str(work / "qmp.sock")):
                replies, events = await play(str(work / "qmp.sock"), script(work, out))
        else:
            replies, events = await play(start_exportd().socket, script(work, out))
        results[who] = (replies, events, out)
    return results
