"""Helpers for the FUSE protocol layer tests: serve a SingleFileFS on this
loop (serving), start the toy server in its own process (start_toy), and run
I/O on a mount from another process, off the serving event loop (child,
with PRELUDE's helpers; pattern())."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

from exportd.fuse.filesystem import SingleFileFS
from exportd.fuse.session import FuseSession
from tests.support import REPO
from tests.support.programs import run

PRELUDE = """
import ctypes, errno, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
def fallocate(fd, mode, off, length):
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
def pattern(n, seed=0):
    period = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (period * (n // 256 + 1))[:n]
def out(obj):
    print(json.dumps(obj)); sys.stdout.flush()
"""

# A child's read that a signal interrupts (run after PRELUDE; argv[1]: the file)
INTERRUPTED_READ = """
import signal
signal.signal(signal.SIGUSR1, lambda *a: None)   # a handler without SA_RESTART
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = ctypes.create_string_buffer(4096)
libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
libc.pread.restype = ctypes.c_ssize_t
n = libc.pread(fd, buf, 4096, 0)
out([n, ctypes.get_errno()])
"""


async def child(code: str, *args: Any, timeout: float = 60, check: bool = True, **kw: Any) -> Any:
    """Run a Python snippet in a fresh process (in a thread, so the loop keeps serving).

    Positional args arrive as sys.argv[1:]; the snippet's last stdout line is
    parsed as JSON when it can be.
    """
    argv = [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)]
    proc = await asyncio.to_thread(run, argv, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    lines = proc.stdout.strip().splitlines()
    if not check:
        return proc
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return proc.stdout


def pattern(n: int, seed: int = 0) -> bytes:
    """Byte i is (7 * i + seed) mod 256 (the same in the child processes)."""
    period = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (period * (n // 256 + 1))[:n]


def dump(obj: Any) -> str:
    return json.dumps(obj)


def start_toy(target: str, *extra: str) -> subprocess.Popen[str]:
    """Start `python -m tests.support.toyfs` and wait until it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.toyfs", target, *extra],
        cwd=REPO,  # where `tests` is importable
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(
            f"toy server did not start: {line} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


@contextlib.asynccontextmanager
async def serving(fs: SingleFileFS, mountpoint: str, **kw: Any) -> AsyncIterator[FuseSession]:
    """`fs` mounted on `mountpoint` by a FuseSession on this loop, closed after."""
    kw.setdefault("fsname", "exportd:test")
    session = await FuseSession.start(fs, mountpoint, **kw)
    try:
        yield session
    finally:
        await session.close()
