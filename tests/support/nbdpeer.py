"""NBD servers as test peers (qemu-nbd, nbdkit, anything with a UNIX
socket): started as child processes, ready once the socket accepts a
connection, stopped (or killed) by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed")
    return path


class Peer:
    """One server process listening on `sock`: a UNIX socket path, or
    "127.0.0.1:PORT" for TCP on loopback."""

    def __init__(self, argv: list[str], sock: str, log: Path | None = None) -> None:
        self.argv = argv
        self.sock = sock
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Peer:
        if self.sock.startswith("/"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock)
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        # without a log, stderr goes to the test's (captured by pytest, shown on failure)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out if self.log else None)
        if self.log:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode} at start")
            if _accepts(self.sock):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not listen on {self.sock} in {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the server goes away without a word."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)  # nbdkit may wait for a connected client to go first
        except subprocess.TimeoutExpired:
            self.kill()


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(where: str) -> bool:
    unix = where.startswith("/")
    s = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if unix:
            s.connect(where)
        else:
            host, port = where.rsplit(":", 1)
            s.connect((host, int(port)))
        return True
    except OSError:
        return False
    finally:
        s.close()


def nbdkit(sock: str, *args: str, log: Path | None = None) -> Peer:
    """nbdkit in the foreground on `sock` (plugin and its arguments in args)."""
    return Peer([need("nbdkit"), "--foreground", "--unix", sock, *args], sock, log)


def qemu_nbd(sock: str, image: str, *args: str, log: Path | None = None) -> Peer:
    """qemu-nbd serving `image` on `sock`, staying up across clients."""
    return Peer([need("qemu-nbd"), "--persistent", "--socket", sock, *args, image], sock, log)
