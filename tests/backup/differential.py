"""Play one backup flow against qemu-storage-daemon 7.2 and exportd, each
on fresh copies of the same images, and compare: replies, job events and
the images the flows leave behind (by content, with qemu-img compare).

Writes to the source while a flow runs go through the daemon, as a
guest's would: qemu-io on the daemon's NBD export of the node."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.blockjobs.test_vs_qemu import _qcow2
from tests.support.daemon import socket_accepts
from tests.support.jobflow import Step, cmd, job_events, play
from tests.support.qsd import running_qsd

ROOT = Path(__file__).resolve().parents[2]


def qcow2(path: Path, size: str = "4M", *writes: str, backing: Path | None = None) -> None:
    _qcow2(path, size, backing, *writes)


def add(d: Path, name: str, fmt: str = "qcow2", **opts: Any) -> Step:
    return cmd("blockdev-add", driver=fmt, node_name=name,
               file={"driver": "file", "filename": str(d / f"{name}.{'raw' if fmt == 'raw' else 'qcow2'}")}, **opts)


def nbd_export(d: Path, node: str, *, writable: bool) -> list[Step]:
    return [cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(d / "nbd.sock")}}),
            cmd("block-export-add", type="nbd", id=f"e-{node}", node_name=node, writable=writable)]


def guest_write(d: Path, node: str, *ops: str) -> Step:
    """qemu-io commands (write -P, write -z, discard) on the NBD export of `node`."""
    def run() -> None:
        args = ["qemu-io", "-f", "raw"]
        for op in ops:
            args += ["-c", op]
        r = subprocess.run([*args, f"nbd+unix:///{node}?socket={d / 'nbd.sock'}"], capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    return ("call", run)


def save_export(d: Path, node: str, out: str) -> Step:
    """A raw copy of what the NBD export of `node` shows now."""
    def run() -> None:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        f"nbd+unix:///{node}?socket={d / 'nbd.sock'}", str(d / out)], check=True)
    return ("call", run)


def drained(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The job events without QEMU's pauses for drained sections: a
    'paused' and the 'running' that follows it (exportd has no drains; a
    user's pause is never part of these flows)."""
    out: list[tuple[str, Any]] = []
    paused: set[str] = set()
    for name, data in events:
        if name == "JOB_STATUS_CHANGE" and data["status"] == "paused":
            paused.add(data["id"])
            continue
        if name == "JOB_STATUS_CHANGE" and data["status"] == "running" and data["id"] in paused:
            paused.discard(data["id"])
            continue
        out.append((name, data))
    return out


def start_exportd(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp_path / "exportd.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "server"))
    log = open(tmp_path / "exportd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "exportd", "--socket", str(sock)], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, sock


async def accepting(sock: Path, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Until the daemon listens on `sock` (the file exists a moment before)."""
    for _ in range(600):
        if sock.exists() and socket_accepts(str(sock)):
            return
        assert proc is None or proc.poll() is None, log.read_text() if log else proc
        await asyncio.sleep(0.05)
    raise AssertionError(f"nobody listens on {sock}")


async def both(tmp_path: Path, make: Callable[[Path], None], steps: Callable[[Path], list[Step]], *,
               numbers: bool = True, normalize: Callable[[Any], Any] = lambda reply: reply,
               after: Callable[[Path], None] = lambda d: None) -> tuple[Path, Path]:
    """Play `steps` against both daemons, each in a directory of its own
    with images made by `make`; `after(d)` runs on each directory once its
    daemon is gone. Compares replies, job events (progress figures too
    unless `numbers` is False) and every image and raw file the flow left
    (by content). Returns (qemu's directory, exportd's)."""
    theirs_d, ours_d = tmp_path / "qsd", tmp_path / "exportd"
    for d in (theirs_d, ours_d):
        d.mkdir()
        make(d)
    async with running_qsd(str(tmp_path / "qsd.sock")):
        await accepting(tmp_path / "qsd.sock")
        theirs, their_events = await play(str(tmp_path / "qsd.sock"), steps(theirs_d))
    after(theirs_d)
    proc, sock = start_exportd(tmp_path)
    try:
        await accepting(sock, proc, tmp_path / "exportd.log")
        ours, our_events = await play(str(sock), steps(ours_d))
    finally:
        proc.terminate()
        proc.wait(30)
    after(ours_d)
    commands = [s for s in steps(ours_d) if s[0] == "cmd"]
    for i, (step, a, b) in enumerate(zip(commands, ours, theirs, strict=True)):
        # the file names in replies name each daemon's own directory
        a = json.loads(json.dumps(a).replace(str(ours_d), "<dir>"))
        b = json.loads(json.dumps(b).replace(str(theirs_d), "<dir>"))
        a, b = (normalize(r) for r in (a, b))
        assert a == b, (f"command {i}", step, a, b)
    ours_seen, theirs_seen = (drained(job_events(e, keep_numbers=numbers)) for e in (our_events, their_events))
    assert ours_seen == theirs_seen, "\n".join(f"{a!s:90} {b!s}" for a, b in
                                             itertools.zip_longest(ours_seen, theirs_seen))
    names = sorted(p.name for p in theirs_d.iterdir() if p.suffix in (".qcow2", ".raw"))
    assert names == sorted(p.name for p in ours_d.iterdir() if p.suffix in (".qcow2", ".raw"))
    for name in names:
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        if fmt == "qcow2":
            r = subprocess.run(["qemu-img", "check", "-q", str(ours_d / name)], capture_output=True, text=True)
            assert r.returncode == 0, (name, r.stdout)
        r = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", fmt, "-F", fmt,
                            str(theirs_d / name), str(ours_d / name)])
        assert r.returncode == 0, f"{name} differs between qemu-storage-daemon and exportd"
    return theirs_d, ours_d
