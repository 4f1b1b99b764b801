#!/usr/bin/env python3
"""exportd's FUSE transports side by side: /dev/fuse, the loop-driven ring,
ring threads and their variants (bench/README.md, Levers).

Not a test, and not the full benchmark (bench/run.py): one exportd per
mode, each exporting two raw images on /dev/shm (passthrough off), and fio
4 KiB direct runs interleaved across the modes, repetition by repetition,
so that the machine's drift hits every mode alike. Prints the median
[min-max] kIOPS per workload and mode, and the load average before and
after.

    .venv/bin/python bench/fuse_modes.py --modes devfuse,loop-ring,threads --reps 5
    .venv/bin/python bench/fuse_modes.py --python /path/to/python3.13t --pythonpath /path/to/shim

FUSE over io_uring needs /sys/module/fuse/parameters/enable_uring = Y.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# mode -> (io-uring option, environment)
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "devfuse": ("off", {}),
    "loop-ring": ("on", {"EXPORTD_FUSE_URING_THREADS": "0"}),
    "threads": ("on", {"EXPORTD_FUSE_URING_THREADS": "1"}),
    "threads-unpinned": ("on", {"EXPORTD_FUSE_URING_THREADS": "1", "EXPORTD_FUSE_URING_PIN": "0"}),
    "one-thread": ("on", {"EXPORTD_FUSE_URING_THREADS": "one"}),
    "one-thread-spin": ("on", {"EXPORTD_FUSE_URING_THREADS": "one", "EXPORTD_FUSE_URING_SPIN_US": "50"}),
}

# workload -> (fio arguments, two exports at once)
WORKLOADS: dict[str, tuple[list[str], bool]] = {
    "randread-qd1": (["--rw=randread", "--ioengine=psync", "--iodepth=1"], False),
    "randwrite-qd1": (["--rw=randwrite", "--ioengine=psync", "--iodepth=1"], False),
    "randread-qd16": (["--rw=randread", "--ioengine=libaio", "--iodepth=16"], False),
    "two-exports": (["--rw=randread", "--ioengine=psync", "--iodepth=1", "--group_reporting"], True),
    "randread-qd1-fio-on-cpu1": (["--rw=randread", "--ioengine=psync", "--iodepth=1", "--cpus_allowed=1"],
                                 False),
    "randread-qd16-fio-on-cpu1": (["--rw=randread", "--ioengine=libaio", "--iodepth=16", "--cpus_allowed=1"],
                                  False),
}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Daemon:
    """One exportd with two exports of two private copies of the image."""

    def __init__(self, mode: str, work: Path, image: Path, python: str, pythonpath: str) -> None:
        io_uring, environ = MODES[mode]
        self.mounts = [work / f"{mode}-{i}.raw" for i in range(2)]
        self.copies: list[Path] = []
        args = [python, "-m", "exportd", "--socket", str(work / f"{mode}.sock")]
        for i, mnt in enumerate(self.mounts):
            copy = Path("/dev/shm") / f"exportd-fuse-modes-{os.getpid()}-{mode}-{i}.raw"
            subprocess.run(["cp", "--sparse=never", str(image), str(copy)], check=True)
            self.copies.append(copy)
            mnt.touch()
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={copy}",
                     "--export", f"type=fuse,id=e{i},node-name=f{i},mountpoint={mnt},writable=on,"
                                 f"passthrough=off,io-uring={io_uring}"]
        path = os.pathsep.join(p for p in (str(REPO / "server"), pythonpath) if p)
        env = os.environ | environ | {"PYTHONPATH": path}
        self.log = open(work / f"{mode}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exportd exited with {self.proc.returncode}: see {self.log.name}")
            mounts = Path("/proc/mounts").read_text()
            if all(str(m) in mounts for m in self.mounts):
                return
            time.sleep(0.05)
        raise TimeoutError(f"exports not mounted after {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.log.close()
        for copy in self.copies:
            copy.unlink(missing_ok=True)


def fio(mounts: list[Path], args: list[str], two: bool, runtime: float) -> float:
    jobs = ["--name=a", f"--filename={mounts[0]}"]
    if two:
        jobs += ["--name=b", f"--filename={mounts[1]}"]
    cmd = ["fio", "--bs=4k", "--direct=1", "--time_based", f"--runtime={runtime}", "--norandommap",
           "--randrepeat=0", "--invalidate=0", "--output-format=json", *args, *jobs]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read"]["iops"] + job["write"]["iops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="devfuse,loop-ring,threads", help=f"of {', '.join(MODES)}")
    parser.add_argument("--workloads", default="randread-qd1,randwrite-qd1,randread-qd16,two-exports",
                        help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=2.0, help="seconds per fio run")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the interpreter that runs exportd (e.g. a free-threaded build)")
    parser.add_argument("--pythonpath", default="", help="added to PYTHONPATH after the server")
    args = parser.parse_args()
    modes = args.modes.split(",")
    workloads = args.workloads.split(",")
    for name in modes + workloads:
        if name not in MODES and name not in WORKLOADS:
            parser.error(f"unknown mode or workload {name!r}")
    results: dict[tuple[str, str], list[float]] = {(m, w): [] for m in modes for w in workloads}
    with tempfile.TemporaryDirectory(prefix="exportd-fuse-modes-") as tmp:
        work = Path(tmp)
        image = Path("/dev/shm") / f"exportd-fuse-modes-{os.getpid()}-base.raw"
        daemons: dict[str, Daemon] = {}
        try:
            with open(image, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(1 << 20))
            for mode in modes:
                daemons[mode] = Daemon(mode, work, image, args.python, args.pythonpath)
            for d in daemons.values():
                d.ready()
            print(f"load average before: {load_average()}", flush=True)
            for _ in range(args.reps):
                for w in workloads:
                    fio_args, two = WORKLOADS[w]
                    for mode, d in daemons.items():
                        results[(mode, w)].append(fio(d.mounts, fio_args, two, args.runtime))
            print(f"load average after: {load_average()}")
        finally:
            for d in daemons.values():
                d.stop()
            image.unlink(missing_ok=True)
    print(f"\n| workload | {' | '.join(modes)} |")
    print(f"|---|{'---:|' * len(modes)}")
    for w in workloads:
        cells = []
        for m in modes:
            v = results[(m, w)]
            cells.append(f"{statistics.median(v) / 1000:.1f}k [{min(v) / 1000:.1f}-{max(v) / 1000:.1f}]")
        print(f"| {w} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
