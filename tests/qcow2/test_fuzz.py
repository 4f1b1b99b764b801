"""Seeded fuzzing of qcow2 headers and tables: opening answers with an error or
opens the image; nothing crashes, hangs or allocates without bound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.qcow2 import qemu_io, run

ROOT = Path(__file__).resolve().parents[2]
CASES = 1200


def _seed_images(d: Path) -> None:
    def mk(name: str, *opts: str, size: str = "2M", backing: str | None = None) -> Path:
        p = d / name
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if opts:
            args += ["-o", ",".join(opts)]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        run(*args, str(p), size)
        return p

    a = mk("v3.qcow2", "cluster_size=4096")
    qemu_io(a, ["write -P 1 0 300k", "write -z 400k 64k", "write -P 2 1M 8k"])
    b = mk("v2.qcow2", "compat=0.10", "cluster_size=512")
    qemu_io(b, ["write -P 3 0 40k", "write -P 4 1M 4k"])
    c = mk("snap.qcow2")
    qemu_io(c, ["write -P 5 0 128k"])
    run("qemu-img", "snapshot", "-c", "s", str(c))
    qemu_io(c, ["write -P 6 0 64k"])
    src = mk("src.raw.qcow2")
    qemu_io(src, ["write -P 7 0 1M"])
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=16384", str(src),
        str(d / "comp.qcow2"))
    src.unlink()
    base = mk("fz-backing.img")  # not a seed itself (*.qcow2); copied beside every case
    qemu_io(base, ["write -P 8 0 2M"])
    top = mk("top.qcow2", "cluster_size=8192", backing="fz-backing.img")
    qemu_io(top, ["write -P 9 4k 20k"])
    mk("rc1.qcow2", "refcount_bits=1", "cluster_size=1024")
    qemu_io(d / "rc1.qcow2", ["write -P 10 0 100k"])


def test_fuzz_headers_and_tables(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    work = tmp_path / "work"
    seeds.mkdir()
    work.mkdir()
    _seed_images(seeds)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'server'}:{ROOT}")
    # the cases in two halves, one fuzzer process per CPU (each case is pure
    # CPU work in Python): the same cases in half the time
    half = CASES // 2
    procs = []
    for i, (start, count) in enumerate(((0, half), (half, CASES - half))):
        part = work / str(i)
        part.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.support.qcow2_fuzz", str(seeds), str(part), str(start), str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        ))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = out.splitlines()
        last_case = next((ln for ln in reversed(lines) if ln.startswith("CASE")), "none")
        assert proc.returncode == 0, f"fuzzer died (rc {proc.returncode}) at {last_case}:\n{err[-3000:]}"
        assert lines and lines[-1] == "FAILURES 0", "\n".join(ln for ln in lines if not ln.startswith("CASE"))[:5000]
