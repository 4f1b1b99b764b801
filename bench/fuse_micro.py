#!/usr/bin/env python3
"""What the FUSE protocol layer alone costs: fio against the toy filesystems.

Not a test. Mounts tests/support/toyfs.py (in its own process) in a few variants
(read() coroutines; read_now extents, spliced or pread: fuse/readreply.py;
kernel passthrough) and runs fio 4 KiB random reads (psync, depth 1) and 1 MiB sequential reads,
direct=1, against each, next to the same reads on the plain file. Prints a
markdown table; next to each rate, the daemon's CPU time per request
(user + system, from /proc), which stays meaningful on a noisy machine
where the rates do not.

    .venv/bin/python bench/fuse_micro.py [--runtime 5] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)  # where `tests` (tests.support.toyfs) is importable
SERVER_DIR = os.path.join(REPO, "server")

WORKLOADS = {
    "4k randread qd1": ["--rw=randread", "--bs=4k", "--ioengine=psync", "--iodepth=1"],
    "4k randread qd16": ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=16"],
    "1M seqread": ["--rw=read", "--bs=1M", "--ioengine=psync", "--iodepth=1"],
}


def fio(path: str, args: list[str], runtime: float, size: int) -> dict[str, float]:
    cmd = [
        "fio",
        "--name=micro",
        f"--filename={path}",
        "--direct=1",
        "--time_based",
        f"--runtime={runtime}",
        f"--size={size}",
        "--output-format=json",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]["read"]
    return {"iops": job["iops"], "mib_s": job["bw_bytes"] / (1 << 20), "ios": job["total_ios"]}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: robust where wall-clock rates are noisy."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Toy:
    """tests.support.toyfs serving one mount in a child process."""

    def __init__(self, mountpoint: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([SERVER_DIR, REPO]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.toyfs", mountpoint, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"toy failed: {line}{self.proc.stderr.read()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _control_plane(work: str, cycles: int, sessions: int) -> tuple[float, float]:
    """(ms per session start+close, KiB of RSS per extra live session)."""
    import asyncio
    import gc
    import time

    sys.path[:0] = [SERVER_DIR, REPO]
    from exportd.fuse.session import FuseSession
    from tests.support.toyfs import MemoryFS

    paths = []
    for i in range(sessions + 1):
        p = os.path.join(work, f"cp{i}.img")
        open(p, "wb").close()
        paths.append(p)
    t = time.perf_counter()
    for _ in range(cycles):
        s = await FuseSession.start(MemoryFS(4096), paths[0], fsname="exportd:cycle")
        await s.close()
    per_cycle = (time.perf_counter() - t) / cycles * 1000
    first = await FuseSession.start(MemoryFS(4096), paths[0], fsname="exportd:m0")
    live = [first]
    try:
        await asyncio.to_thread(lambda: open(paths[0], "rb").read())  # buffers exist now
        gc.collect()
        before = _rss()
        for i in range(1, sessions + 1):
            live.append(await FuseSession.start(MemoryFS(4096), paths[i], fsname=f"exportd:m{i}"))
        await asyncio.to_thread(lambda: [open(p, "rb").read() for p in paths[1:]])
        gc.collect()
        per_session = (_rss() - before) / sessions / 1024
    finally:
        await asyncio.gather(*(s.close() for s in live))
    return per_cycle, per_session


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", type=float, default=5)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args()
    if not shutil.which("fio"):
        print("fio is not installed", file=sys.stderr)
        return 1
    size = args.size_mib << 20
    work = tempfile.mkdtemp(prefix="exportd-fuse-micro-", dir=args.dir)
    backing = os.path.join(work, "backing.raw")
    with open(backing, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    mnt = os.path.join(work, "mnt.raw")
    open(mnt, "wb").close()
    variants = [
        ("plain file (no FUSE)", None),
        ("toy MemoryFS, asyncio", ["--size", str(size), "--fill"]),
        ("toy MemoryFS, uvloop", ["--size", str(size), "--fill", "--uvloop"]),
        ("toy FileFS pread, uvloop", ["--file", backing, "--uvloop"]),
        ("toy FileFS extents, uvloop", ["--file", backing, "--extents", "--uvloop"]),
        ("toy FileFS passthrough", ["--file", backing, "--passthrough", "--uvloop"]),
    ]
    rows = []
    try:
        for name, toy_args in variants:
            toy = Toy(mnt, *toy_args) if toy_args is not None else None
            try:
                path = mnt if toy else backing
                results = {}
                for w, a in WORKLOADS.items():
                    cpu0 = cpu_seconds(toy.proc.pid) if toy else 0.0
                    results[w] = fio(path, a, args.runtime, size)
                    if toy:
                        spent = cpu_seconds(toy.proc.pid) - cpu0
                        results[w]["cpu_us"] = spent * 1e6 / max(results[w]["ios"], 1)
            finally:
                if toy:
                    toy.stop()
            rows.append((name, results))
            print(f"done: {name}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    import asyncio

    cp_work = tempfile.mkdtemp(prefix="exportd-fuse-micro-cp-", dir=args.dir)
    try:
        per_cycle, per_session = asyncio.run(_control_plane(cp_work, 100, 100))
    finally:
        shutil.rmtree(cp_work, ignore_errors=True)
    head = "| variant | " + " | ".join(WORKLOADS) + " |"
    print(head)
    print("|" + "---|" * (len(WORKLOADS) + 1))
    for name, results in rows:
        cells = []
        for w in WORKLOADS:
            r = results[w]
            cell = f"{r['mib_s']:.0f} MiB/s" if w.startswith("1M") else f"{r['iops']:.0f} IOPS"
            if "cpu_us" in r:
                cell += f" ({r['cpu_us']:.1f} µs CPU/req)"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| control plane (toy MemoryFS, asyncio) | |")
    print("|---|---|")
    print(f"| session start + close | {per_cycle:.2f} ms |")
    print(f"| memory per extra live session | {per_session:.1f} KiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
