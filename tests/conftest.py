"""Shared fixtures for every exportd test.

exportd_bin, exportctl_bin   Path of .venv/bin/exportd / .venv/bin/exportctl.

daemon                       Factory: start a real exportd process.
                                 d = daemon()                      # QMP on a socket in tmp_path
                                 d = daemon("--blockdev", "driver=null-co,node-name=n0")
                                 d = daemon(..., wait=False)       # don't wait for the socket
                             Returns a DaemonProcess with .socket (str), .pid, .proc
                             (subprocess.Popen), .stderr (text so far), .alive,
                             .wait(timeout) -> exit status, .terminate(timeout) -> exit status.
                             It waits until the socket accepts connections (or the
                             process exits: then DaemonStartError with its stderr).
                             Teardown: SIGTERM (shuts down like quit), then SIGKILL by pid
                             after 15 s. Extra keyword `env` adds environment variables.

qmp                          Async factory: a connected, negotiated qemu.qmp.QMPClient.
                                 client = await qmp(d)            # or qmp("/path/to.sock")
                                 await client.execute("query-version")
                             Disconnected at teardown.

exportctl                    Run the exportctl CLI against a daemon:
                                 r = exportctl(d, "list", "--json")   # CompletedProcess (text)
                             d may be None (no -s given) or a socket path.

All processes started here are ended by pid; sockets live in short paths
(UNIX socket paths are limited to 107 bytes).
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def _bin(name: str) -> Path:
    p = VENV_BIN / name
    if p.exists():
        return p
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (run make setup)")
    return Path(found)


@pytest.fixture(scope="session")
def exportd_bin() -> Path:
    return _bin("exportd")


@pytest.fixture(scope="session")
def exportctl_bin() -> Path:
    return _bin("exportctl")


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


@pytest.fixture
def daemon(exportd_bin: Path, tmp_path: Path):
    started: list[DaemonProcess] = []
    cleanup_dirs: list[Path] = []

    def start(*args: str, wait: bool = True, socket_name: str = "qmp.sock",
              env: dict[str, str] | None = None, with_socket: bool = True) -> DaemonProcess:
        workdir = short_dir(tmp_path)
        if workdir != tmp_path:
            cleanup_dirs.append(workdir)
        sock = str(workdir / f"{len(started)}-{socket_name}")
        stderr_path = tmp_path / f"exportd-{len(started)}.stderr"
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
        started.append(d)
        if wait and with_socket:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not socket_accepts(sock):
                if proc.poll() is not None:
                    raise DaemonStartError(f"exportd exited with {proc.returncode}: {d.stderr}")
                if time.monotonic() > deadline:
                    raise DaemonStartError(f"exportd did not listen within {START_TIMEOUT_S}s: {d.stderr}")
                time.sleep(0.02)
        return d

    yield start
    for d in started:
        d.terminate()
    for p in cleanup_dirs:
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
async def qmp():
    from qemu.qmp import QMPClient

    clients: list[Any] = []

    async def connect(target: DaemonProcess | str, name: str = "test") -> Any:
        path = target.socket if isinstance(target, DaemonProcess) else str(target)
        client = QMPClient(name)
        await client.connect(path)
        clients.append(client)
        return client

    yield connect
    for c in clients:
        try:
            await c.disconnect()
        except Exception:
            pass


@pytest.fixture
def exportctl(exportctl_bin: Path):
    def run(target: DaemonProcess | str | None, *args: str, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(exportctl_bin)]
        if target is not None:
            path = target.socket if isinstance(target, DaemonProcess) else str(target)
            cmd += ["-s", path]
        cmd += list(args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)

    return run


def pytest_configure(config: Any) -> None:
    # the test process itself may build deeply nested JSON for fuzzing
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
