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
                             after 15 s. Extra keyword `env` adds environment variables;
                             with_socket=False leaves out --socket (you give the monitor).

module_daemon                One plain daemon (no extra args) shared by a whole test
                             module; a DaemonProcess as above. Do not quit it.

qmp                          Async factory: a connected, negotiated qemu.qmp.QMPClient.
                                 client = await qmp(d)            # or qmp("/path/to.sock")
                                 await client.execute("query-version")
                             Disconnected at teardown.

raw_qmp                      Factory: a plain-socket QMP connection (bytes level).
                                 c = raw_qmp(d)                    # greeting already read
                                 c.send(b'{"execute": "qmp_capabilities"}')
                                 c.recv_msg() -> dict              # one CRLF-terminated message
                                 c.cmd("query-version") -> reply dict (negotiate first)
                                 c.negotiate(); c.close()
                             Closed at teardown.

graph                        An in-process BlockGraph (no daemon), every node closed at teardown.

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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from exportd.block.graph import BlockGraph

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


@pytest.fixture
def daemon(exportd_bin: Path, tmp_path: Path):
    started: list[DaemonProcess] = []
    workdir = short_dir(tmp_path)

    def start(*args: str, **kw: Any) -> DaemonProcess:
        try:
            d = spawn_daemon(exportd_bin, workdir, tmp_path, *args, **kw)
        except DaemonStartError:
            raise
        started.append(d)
        return d

    yield start
    for d in started:
        d.terminate()
    if workdir != tmp_path:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def module_daemon(exportd_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """One plain daemon shared by a test module (do not quit it)."""
    logdir = tmp_path_factory.mktemp("exportd")
    workdir = short_dir(logdir)
    d = spawn_daemon(exportd_bin, workdir, logdir)
    yield d
    d.terminate()
    if workdir != logdir:
        shutil.rmtree(workdir, ignore_errors=True)


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


class RawQMP:
    """A QMP connection over a plain socket, for byte-level tests."""

    def __init__(self, path: str, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv_msg()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self) -> bytes:
        """One server message with its CRLF; b"" when the server closed."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def recv_msg(self) -> dict[str, Any]:
        import json

        line = self.recv_line()
        if not line:
            raise EOFError("the server closed the connection")
        return json.loads(line)

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        import json

        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(json.dumps(msg))
        while True:
            reply = self.recv_msg()
            if "event" not in reply:
                return reply

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_qmp():
    conns: list[RawQMP] = []

    def connect(target: DaemonProcess | str, timeout: float = 15.0) -> RawQMP:
        path = target.socket if isinstance(target, DaemonProcess) else str(target)
        c = RawQMP(path, timeout)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


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


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph(None)
    try:
        yield g
    finally:
        await g.close_all()
