"""kill -9 of the daemon during a write storm through a qcow2 FUSE export
(pwrite, punch-hole, zero-range, fsync from a child process), a few rounds
over different variants: the image then passes `qemu-img check` (leaked
clusters allowed, nothing else), internal snapshots are intact, and every byte
written before the last acknowledged fsync and not touched since is there."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import SUPPORT_DIR
from tests.support.daemon import Exportd
from tests.support.fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    ops,
)
from tests.support.mounts import lazy_unmount_all
from tests.support.programs import arun
from tests.support.qcow2_export import convert_raw, export_qcow2, merge
from tests.support.qcow2_variants import build
from tests.support.threads import athread

STORM = SUPPORT_DIR / "fuse_storm.py"
ROUNDS = [("v3-64k", 0), ("backing3", 1), ("snapshots", 2), ("rc64", 3), ("v2", 4),
          ("compressed-zstd", 5), ("lazy", 6)]


async def check_no_corruption(img: Path) -> None:
    """qemu-img check: 0 (clean) or 3 (leaks only) and no corruptions/errors."""
    r = await arun(["qemu-img", "check", "--output=json", str(img)], timeout=90)
    assert r.returncode in (0, 3), f"qemu-img check rc={r.returncode}\n{r.stdout}{r.stderr}"
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("check-errors"), info


def storm_until(mnt: Path, seed: str, kill_after_op: int, kill) -> list[str]:  # noqa: ANN001
    """Run the storm; once it announced op `kill_after_op` with an ACK seen, call
    kill(). Returns all the lines the storm printed."""
    p = subprocess.Popen([sys.executable, str(STORM), str(mnt), seed], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    killed = False
    timer = threading.Timer(30, kill)  # never hang on a storm that stopped printing
    timer.start()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.strip())
            if not killed and line.startswith("OP ") and int(line.split()[1]) >= kill_after_op \
                    and any(x.startswith("ACK") for x in lines):
                killed = True
                kill()
        p.wait(30)
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait(10)
    return lines


@pytest.mark.parametrize(("variant", "rnd"), ROUNDS)
async def test_kill9_during_write_storm(workdir: Path, variant: str, rnd: int) -> None:
    img = await athread(build, variant, workdir, timeout=60)
    original = await convert_raw(img, workdir / "before.raw")
    snaps = {}
    if variant == "snapshots":
        for s in ("s1", "s2"):
            snaps[s] = await convert_raw(img, workdir / f"{s}.raw", snapshot=s)
    seed = f"storm-{variant}-{rnd}"
    kill_after = random.Random(seed).randrange(15, 60)
    d = Exportd(workdir)
    await d.start()
    mnt = workdir / "mnt.raw"
    try:
        await export_qcow2(d, img, mnt, writable=True, discard="unmap" if rnd % 2 else "ignore")
        await d.disconnect()  # nothing more to say; the QMP client must not block the kill
        lines = await athread(storm_until, mnt, seed, kill_after, d.kill9, timeout=60)
    finally:
        await d.stop()
        lazy_unmount_all(str(workdir))
    assert d.proc is not None and d.proc.returncode == -9, "the daemon was killed mid-storm"
    acked = max(int(x.split()[1]) for x in lines if x.startswith("ACK"))
    last_op = max(int(x.split()[1]) for x in lines if x.startswith("OP"))
    assert lines[-1].startswith("ERR"), lines[-3:]  # the storm saw the daemon go

    await check_no_corruption(img)
    for s, before in snaps.items():
        assert await convert_raw(img, workdir / f"{s}-after.raw", snapshot=s) == before, s

    # replay: acknowledged ops define the image, except bytes any later op touched
    model = bytearray(original)
    uncertain: list[tuple[int, int]] = []
    data_rng = random.Random(f"data-{seed}")
    for i, (kind, off, ln) in enumerate(ops(seed, len(model), last_op + 1)):
        data = data_rng.randbytes(ln) if kind == "write" else bytes(ln)
        if kind == "fsync":
            continue
        if i < acked:
            model[off : off + ln] = data
        else:
            uncertain.append((off, off + ln))
    after = await convert_raw(img, workdir / "after.raw")
    assert len(after) == len(model)
    pos = 0
    for s, e in [*merge(uncertain), (len(model), len(model))]:
        if after[pos:s] != model[pos:s]:
            bad = next(i for i in range(pos, s) if after[i] != model[i])
            raise AssertionError(f"acknowledged data lost at {bad} (acked {acked}, last op {last_op})")
        pos = max(pos, e)


def write_then_zero(mnt: Path) -> None:
    """A write, then zero-range, punch-hole and an unaligned zero-range; each
    acknowledged before the next starts. No fsync: the export is writethrough."""
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\xaa" * 65536, 0) == 65536
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 1 << 20, 256 * 1024)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 << 20, 256 * 1024)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, (3 << 20) + 100, 5000)
    finally:
        os.close(fd)


async def test_writethrough_zeroing_survives_kill9(workdir: Path) -> None:
    """Acknowledged writes and zeroings on a writethrough export survive kill -9
    without any fsync: no qcow2 metadata is left only in the daemon's memory."""
    img = workdir / "wt.qcow2"
    r = await arun(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"])
    assert r.returncode == 0, r.stderr
    r = await arun(["qemu-io", "-c", "write -P 0x55 0 4M", str(img)])
    assert r.returncode == 0, r.stderr
    d = Exportd(workdir)
    await d.start()
    mnt = workdir / "mnt.raw"
    try:
        await export_qcow2(d, img, mnt, writable=True, discard="unmap",
                           export_opts={"writethrough": True})
        await d.disconnect()
        await athread(write_then_zero, mnt)
        d.kill9()
    finally:
        await d.stop()
        lazy_unmount_all(str(workdir))
    await check_no_corruption(img)
    want = bytearray(b"\x55" * (4 << 20))
    want[0:65536] = b"\xaa" * 65536
    for off, ln in ((1 << 20, 256 * 1024), (2 << 20, 256 * 1024), ((3 << 20) + 100, 5000)):
        want[off : off + ln] = bytes(ln)
    after = await convert_raw(img, workdir / "after.raw")
    for off, ln in ((0, 65536), (1 << 20, 256 * 1024), (2 << 20, 256 * 1024), ((3 << 20) + 100, 5000)):
        assert after[off : off + ln] == want[off : off + ln], f"acknowledged range at {off} lost"
    assert after == want
