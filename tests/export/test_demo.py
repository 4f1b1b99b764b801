"""`make demo` (python -m exportd.demo) does the main job end to end and the
stop command it prints really stops the daemon and unmounts."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

from tests.support.mounts import fuse_mounts_under
from tests.support.programs import arun


async def test_demo_end_to_end(workdir: Path) -> None:
    demo_dir = workdir / "demo"
    r = await arun([sys.executable, "-m", "exportd.demo", "--dir", str(demo_dir)], timeout=120)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "exportctl list" in r.stdout and "demo" in r.stdout
        assert "at 1 MiB: Hello from exportd" in r.stdout
        assert fuse_mounts_under(str(demo_dir)) == [str(demo_dir / "disk.raw")]
        stop = next(
            line.strip() for line in reversed(r.stdout.splitlines()) if line.strip().endswith(" quit")
        )
        s = await arun(shlex.split(stop), timeout=60)
        assert s.returncode == 0, s.stdout + s.stderr
        for _ in range(100):
            if not fuse_mounts_under(str(demo_dir)):
                break
            await asyncio.sleep(0.1)
        assert fuse_mounts_under(str(demo_dir)) == []
    finally:
        pidfile = demo_dir / "exportd.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
