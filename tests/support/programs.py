"""External programs (qemu-img, dd, stat, setpriv...) run by tests, each in
its own process with a time limit."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(cmd: list[str], *, timeout: float = 60, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """A tool on the mounts, in its own process, with a time limit."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


async def arun(cmd: list[str], *, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """run() without blocking this test's event loop (QMP events keep flowing)."""
    return await asyncio.to_thread(run, cmd, timeout=timeout, check=check)


async def command(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a program (cp, dd, ...) in a thread; fails the test on a nonzero exit."""
    proc = await asyncio.to_thread(run, list(argv), timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
    return proc


def qemu_img_info_tls(sock: object, client_dir: object) -> subprocess.CompletedProcess[str]:
    """`qemu-img info` of export disk0 on the NBD server at UNIX socket
    `sock`, over TLS with the client credentials in `client_dir`
    (certificate name localhost)."""
    return subprocess.run(
        ["qemu-img", "info", "--output=json",
         "--object", f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
         "--image-opts", f"driver=nbd,server.type=unix,server.path={sock},export=disk0,tls-creds=tls0,"
         "tls-hostname=localhost"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
