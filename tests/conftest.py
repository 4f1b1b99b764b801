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

shm                          A private directory on /dev/shm (tmpfs), removed at teardown.

exportctl                    Run the exportctl CLI against a daemon:
                                 r = exportctl(d, "list", "--json")   # CompletedProcess (text)
                             d may be None (no -s given) or a socket path.

All processes started here are ended by pid; sockets live in short paths
(UNIX socket paths are limited to 107 bytes). Helpers live in tests/support/
(daemon.py, qmp.py, ...); this file holds only fixtures and hooks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from exportd.block.graph import BlockGraph
from tests.support.daemon import DaemonProcess, DaemonStartError, find_bin, short_dir, spawn_daemon
from tests.support.qmp import RawQMP


@pytest.fixture(scope="session")
def exportd_bin() -> Path:
    return find_bin("exportd")


@pytest.fixture(scope="session")
def exportctl_bin() -> Path:
    return find_bin("exportctl")


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


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private directory on tmpfs, whose pages never block (the inline,
    spliced data path), removed afterwards."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="exportd-shm-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
