"""Real exportd processes for tests.

DaemonProcess   an exportd started by spawn_daemon() (the root conftest's
                `daemon` and `module_daemon` fixtures): pid, socket, stderr,
                wait(), terminate().
Exportd         an exportd plus a negotiated qemu.qmp connection and its
                events, with the QMP calls the export tests repeat
                (the `exportd` fixture of tests.support.export_fixtures).

Processes are ended by pid; sockets live in short paths (UNIX socket paths
are limited to 107 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.support import REPO

VENV_BIN = REPO / ".venv" / "bin"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def find_bin(name: str) -> Path:
    """The venv's program `name` (else the one on PATH; else the test is skipped)."""
    p = VENV_BIN / name
    if p.exists():
        return p
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (run make setup)")
    return Path(found)


class DaemonStartError(RuntimeError):
    pass


class DaemonProcess:
    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str, stderr_path: Path, workdir: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket = socket_path
        self.stderr_path = stderr_path
        self.workdir = workdir

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not end in time."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.proc.wait(timeout)

    def __repr__(self) -> str:
        return f"<exportd pid={self.pid} socket={self.socket}>"


def socket_accepts(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def short_dir(tmp_path: Path) -> Path:
    """tmp_path if a socket path in it fits, else a short directory under /tmp."""
    if len(str(tmp_path)) < 80:
        return tmp_path
    d = Path(tempfile.mkdtemp(prefix="exd-", dir="/tmp"))
    return d


def spawn_daemon(exportd_bin: Path, workdir: Path, logdir: Path, *args: str, wait: bool = True,
                 socket_name: str = "qmp.sock", env: dict[str, str] | None = None,
                 with_socket: bool = True) -> DaemonProcess:
    """Start exportd with `--socket workdir/<n>-socket_name` plus args."""
    n = len(list(logdir.glob("exportd-*.stderr")))
    sock = str(workdir / f"{n}-{socket_name}")
    stderr_path = logdir / f"exportd-{n}.stderr"
    cmd = [str(exportd_bin)]
    if with_socket:
        cmd += ["--socket", sock]
    cmd += list(args)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=full_env)
    d = DaemonProcess(proc, sock, stderr_path, workdir)
    if wait and with_socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not socket_accepts(sock):
            if proc.poll() is not None:
                raise DaemonStartError(f"exportd exited with {proc.returncode}: {d.stderr}")
            if time.monotonic() > deadline:
                d.terminate()
                raise DaemonStartError(f"exportd did not listen within {START_TIMEOUT_S}s: {d.stderr}")
            time.sleep(0.02)
    return d


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
