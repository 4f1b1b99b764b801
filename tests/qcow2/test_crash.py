"""kill -9 during a write storm, 20 rounds: every image passes `qemu-img check`
without errors (leaks allowed) and data acknowledged by flush is there."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import qcow2_storm as storm
from tests.support.qcow2 import MiB, run, to_raw

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 20
TOTAL_OPS = 3000

# (qemu-img create options, with a backing file, with a snapshot)
SETUPS = [
    ("cluster_size=4096", False, False),
    ("cluster_size=512,refcount_bits=64", False, False),  # refcount table growth
    ("cluster_size=65536", True, False),
    ("cluster_size=16384", False, True),
    ("cluster_size=2048,compat=0.10", False, False),
]


def _make(tmp: Path, rnd: int) -> tuple[Path, int, bytes]:
    opts, with_backing, with_snap = SETUPS[rnd % len(SETUPS)]
    img = tmp / f"storm{rnd}.qcow2"
    size = 3 * MiB
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if with_backing:
        base = tmp / f"base{rnd}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
        run("qemu-io", "-c", "write -P 0x77 0 3M", str(base))
        args += ["-b", base.name, "-F", "qcow2"]
    run(*args, str(img), str(size))
    run("qemu-io", "-c", "write -P 0x31 512k 1M", str(img))
    if with_snap:
        run("qemu-img", "snapshot", "-c", "snap", str(img))
    initial = to_raw(img, tmp / "initial.raw")
    cs = int(opts.split("cluster_size=")[1].split(",")[0])
    return img, cs, initial


def test_kill9_write_storm(tmp_path: Path) -> None:
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'server'}:{ROOT}")
    for rnd in range(ROUNDS):
        img, cs, initial = _make(tmp_path, rnd)
        seed = rng.randrange(1 << 30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.qcow2_storm", str(img), str(seed), str(TOTAL_OPS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.stderr else ""
            time.sleep(rng.uniform(0.02, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        acks = [int(line.split()[1]) for line in out.splitlines() if line.startswith("ACK")]
        acked = acks[-1] if acks else 0
        print(f"round {rnd}: {acked} ops acknowledged, {'done' if 'DONE' in out else 'killed'}")
        assert "Traceback" not in err, err

        r = subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 3), f"round {rnd}: {r.stdout}{r.stderr}"  # 3: leaks only
        res = json.loads(r.stdout)
        assert not res.get("corruptions") and not res.get("check-errors"), res

        model = bytearray(initial)
        all_ops = list(storm.ops(seed, len(model), TOTAL_OPS))
        for op in all_ops[:acked]:
            storm.apply(model, op, seed, cs)
        # bytes touched by operations after the last acknowledgement may hold either state
        touched = bytearray(len(model))
        for kind, off, ln, _ in all_ops[acked:]:
            lo = off if kind != "discard" else off // cs * cs
            hi = off + ln if kind != "discard" else min(len(model), -(-(off + ln) // cs) * cs)
            touched[lo:hi] = b"\x01" * (hi - lo)
        got = to_raw(img, tmp_path / "after.raw")
        bad = [i for i in range(0, len(model), 512)
               if not any(touched[i : i + 512]) and got[i : i + 512] != model[i : i + 512]]
        assert not bad, f"round {rnd}: acknowledged data lost at offsets {bad[:5]} (acked={acked})"
        if SETUPS[rnd % len(SETUPS)][2]:
            snap = tmp_path / "snap.raw"
            run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=snap", str(img), str(snap))
            assert snap.read_bytes() == initial
        img.unlink()
