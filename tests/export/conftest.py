"""Fixtures for the FUSE export tests: a real exportd process driven over QMP
with the qemu.qmp library, real mounts, real tools (stat, dd, qemu-img...).

Every syscall on a mount happens in this test process or a child process,
never in the daemon. Every mount made under a test's directory is lazily
unmounted in teardown even if the daemon died or the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

REPO = Path(__file__).resolve().parents[2]


def fuse_mounts_under(root: str) -> list[str]:
    """Mountpoints of FUSE mounts below `root`, newest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split()[0] if right else ""
            mountpoint = fields[4].replace("\\040", " ")
            if fstype.startswith("fuse") and (mountpoint == root or mountpoint.startswith(root + "/")):
                found.append(mountpoint)
    return found[::-1]


def lazy_unmount_all(root: str) -> None:
    for _ in range(4):
        mounts = fuse_mounts_under(root)
        if not mounts:
            return
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=20)


def run(cmd: list[str], *, timeout: float = 60, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """A tool on the mounts, in its own process, with a time limit."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


async def arun(cmd: list[str], *, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """run() without blocking this test's event loop (QMP events keep flowing)."""
    return await asyncio.to_thread(run, cmd, timeout=timeout, check=check)


async def athread(fn, *args, timeout: float = 30):  # noqa: ANN001, ANN201
    """A Python syscall on a mount, in a worker thread with a time limit."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)


class Exportd:
    """One exportd process and a negotiated QMP connection to it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = workdir / "qmp.sock"
        self.proc: subprocess.Popen | None = None
        self.client: QMPClient | None = None
        self.events = EventListener()
        self._backlog: list[Any] = []
        self.log = workdir / "exportd.log"

    async def start(self, *extra: str) -> Exportd:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exportd", "--socket", str(self.sock), *extra],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for _ in range(600):  # 30 s, as the root conftest allows
            if self.sock.exists():
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"exportd exited: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"exportd made no socket in 30 s: {self.log.read_text()[-2000:]}")
        self.client = QMPClient("test")
        self.events = EventListener()
        self.client.register_listener(self.events)
        await self.client.connect(str(self.sock))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        assert self.client is not None
        return await self.client.execute(name, args or {})

    async def error(self, name: str, args: dict[str, Any] | None = None) -> str:
        """The error text of a command that must fail."""
        try:
            result = await self.cmd(name, args)
        except ExecuteError as e:
            return e.error.error.desc
        raise AssertionError(f"{name} succeeded unexpectedly: {result!r}")

    async def event(self, name: str, timeout: float = 15) -> dict[str, Any]:
        """The next event called `name`; others seen meanwhile stay queued
        for later calls (event order between names is not assumed)."""
        for i, ev in enumerate(self._backlog):
            if ev["event"] == name:
                del self._backlog[i]
                return ev.get("data", {})

        async def wait() -> dict[str, Any]:
            while True:
                ev = await self.events.get()
                if ev["event"] == name:
                    return ev.get("data", {})
                self._backlog.append(ev)

        return await asyncio.wait_for(wait(), timeout)

    # --- exports ----------------------------------------------------------
    async def blockdev_file(self, name: str, filename: Path | str, **opts: Any) -> None:
        await self.cmd("blockdev-add", {"driver": "file", "node-name": name, "filename": str(filename), **opts})

    async def add_export(self, export_id: str, node: str, mountpoint: Path | str, **opts: Any) -> None:
        args = {"type": "fuse", "id": export_id, "node-name": node, "mountpoint": str(mountpoint)}
        args.update({k.replace("_", "-"): v for k, v in opts.items()})
        await self.cmd("block-export-add", args)

    async def del_export(self, export_id: str, mode: str | None = None) -> None:
        args: dict[str, Any] = {"id": export_id}
        if mode:
            args["mode"] = mode
        await self.cmd("block-export-del", args)
        data = await self.event("BLOCK_EXPORT_DELETED")
        assert data == {"id": export_id}

    async def exports(self) -> list[dict[str, Any]]:
        return await self.cmd("query-block-exports")

    # --- ending -------------------------------------------------------------
    async def disconnect(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.disconnect(), 5)
            self.client = None

    async def quit(self) -> None:
        await self.cmd("quit")
        await self.disconnect()
        assert self.proc is not None
        await asyncio.to_thread(self.proc.wait, 20)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> None:
        await self.disconnect()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._logf.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every user can traverse (tests run tools as `nobody` too),
    with the lazy-unmount safety net for anything mounted below it."""
    d = Path(tempfile.mkdtemp(prefix="exportd-export-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        lazy_unmount_all(str(d))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def exportd(workdir: Path) -> AsyncIterator[Exportd]:
    d = Exportd(workdir)
    try:
        await d.start()  # inside the try: a failed start still stops the process
        yield d
    finally:
        await d.stop()
        lazy_unmount_all(str(workdir))


@pytest.fixture
async def host(workdir: Path):  # noqa: ANN201
    """An in-process ExportTable and BlockGraph (test_lifecycle.Host), torn down after."""
    from .test_lifecycle import Host

    h = Host()
    try:
        yield h
    finally:
        await h.exports.shutdown_all()
        await h.graph.close_all()


def make_image(path: Path, size: int, *, seed: int = 1, sparse: bool = False) -> bytes:
    """A raw image of `size` bytes of pseudo-random data (or empty and sparse)."""
    if sparse:
        with open(path, "wb") as f:
            f.truncate(size)
        return bytes(size)
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
