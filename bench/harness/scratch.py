"""The run's scratch directory on tmpfs, and the guarantee that it goes away.

Everything a run creates (images, mountpoints, sockets, logs, fio output)
lives under /dev/shm/exportd-bench-<pid>/. Child processes are recorded in
pids.txt there, so cleanup can stop them, detach every mount below the
directory and delete it, on normal exit, exception or signal alike; a later
run also sweeps up directories left behind by a harness that was SIGKILLed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .mounts import force_unmount, mounts_under

SCRATCH_ROOT = Path("/dev/shm")
PREFIX = "exportd-bench-"
STALE_AFTER_S = 30.0


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Scratch:
    """Owns one scratch directory and the processes started to work in it."""

    def __init__(self, root: Path = SCRATCH_ROOT) -> None:
        self.path = root / f"{PREFIX}{os.getpid()}"
        self.path.mkdir(mode=0o755)
        self._pid_file = self.path / "pids.txt"
        self._procs: list[subprocess.Popen] = []

    def file(self, name: str) -> Path:
        return self.path / name

    def dir(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Remember a child so cleanup can end it if its owner does not."""
        self._procs.append(proc)
        with self._pid_file.open("a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def cleanup(self) -> None:
        for proc in self._procs:
            stop_process(proc, grace=5.0)
        for mount in mounts_under(self.path):
            force_unmount(mount)
        shutil.rmtree(self.path, ignore_errors=True)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to grace seconds, then SIGKILL. Returns the exit status."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None


def sweep_stale(root: Path = SCRATCH_ROOT) -> list[Path]:
    """Remove scratch directories of harness runs that no longer exist."""
    swept = []
    for d in root.glob(f"{PREFIX}*"):
        try:
            owner = int(d.name[len(PREFIX):])
        except ValueError:
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        try:
            # A run in another pid namespace would look dead: leave any
            # directory that was written to recently.
            if time.time() - d.stat().st_mtime < STALE_AFTER_S:
                continue
        except OSError:
            continue
        pid_file = d / "pids.txt"
        if pid_file.exists():
            for line in pid_file.read_text().split():
                pid = int(line)
                # Only a process still working in that directory is ours.
                if _pid_alive(pid) and str(d) in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for mount in mounts_under(d):
            force_unmount(mount)
        shutil.rmtree(d, ignore_errors=True)
        swept.append(d)
    return swept


class Interrupted(BaseException):
    """Raised from SIGTERM/SIGHUP so the same finally blocks run as for Ctrl-C."""


def raise_on_termination_signals() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    # A shell starting us in the background may have ignored SIGINT; Ctrl-C
    # or kill -INT must still end the run through the cleanup path.
    signal.signal(signal.SIGINT, signal.default_int_handler)
