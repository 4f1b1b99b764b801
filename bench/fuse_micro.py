#!/usr/bin/env python3
"""What the FUSE protocol layer alone costs: fio against the toy filesystems.

Not a test. Mounts exportd.fuse.toy (in its own process) in a few variants
and runs fio 4 KiB random reads (psync, depth 1) and 1 MiB sequential reads,
direct=1, against each, next to the same reads on the plain file. Prints a
markdown table.

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
SERVER_DIR = os.path.join(os.path.dirname(HERE), "server")

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
    return {"iops": job["iops"], "mib_s": job["bw_bytes"] / (1 << 20)}


class Toy:
    """exportd.fuse.toy serving one mount in a child process."""

    def __init__(self, mountpoint: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=SERVER_DIR)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exportd.fuse.toy", mountpoint, *args],
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
        ("toy FileFS passthrough", ["--file", backing, "--passthrough", "--uvloop"]),
    ]
    rows = []
    try:
        for name, toy_args in variants:
            toy = Toy(mnt, *toy_args) if toy_args is not None else None
            try:
                path = mnt if toy else backing
                results = {w: fio(path, a, args.runtime, size) for w, a in WORKLOADS.items()}
            finally:
                if toy:
                    toy.stop()
            rows.append((name, results))
            print(f"done: {name}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    head = "| variant | " + " | ".join(WORKLOADS) + " |"
    print(head)
    print("|" + "---|" * (len(WORKLOADS) + 1))
    for name, results in rows:
        cells = []
        for w in WORKLOADS:
            r = results[w]
            cells.append(
                f"{r['mib_s']:.0f} MiB/s" if w.startswith("1M") else f"{r['iops']:.0f} IOPS"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
