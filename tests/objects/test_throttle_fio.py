"""The throttle driver under fio, through FUSE exports of one exportd: two
throttle nodes of one group together stay within 10% of the group's IOPS
limit and share it, a node with a bandwidth limit stays within 10% of it,
and an unthrottled export on the same daemon keeps its speed meanwhile
(waiting requests are timers on the loop, which never blocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun, have

pytestmark = pytest.mark.skipif(not have("fio"), reason="fio missing")

M = 1 << 20
SIZE = 32 * M
IOPS_LIMIT = 300  # far below what the machine does, even loaded
BPS_LIMIT = 4 * M
RUNTIME_S = 4


def fio_job(name: str, mnt: Path, rw: str, bs: str, *, depth: int) -> list[str]:
    return [f"--name={name}", f"--filename={mnt}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}"]


async def fio(*jobs: list[str]) -> dict[str, dict[str, Any]]:
    """Run the jobs side by side (direct I/O: every request reaches exportd);
    each job's json result by name."""
    cmd = ["fio", "--output-format=json", "--ioengine=libaio", "--direct=1", f"--size={SIZE}",
           "--time_based", f"--runtime={RUNTIME_S}", "--randrepeat=0", "--thread",
           *(arg for job in jobs for arg in job)]
    r = await arun(cmd, timeout=RUNTIME_S * 10 + 60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {job["jobname"]: job for job in json.loads(r.stdout)["jobs"]}


def iops(job: dict[str, Any]) -> float:
    return job["read"]["iops"] + job["write"]["iops"]


def bandwidth(job: dict[str, Any]) -> float:
    """Bytes per second, reads and writes."""
    return job["read"]["bw_bytes"] + job["write"]["bw_bytes"]


async def image_node(d: Exportd, workdir: Path, name: str) -> None:
    img = workdir / f"{name}.img"
    with open(img, "wb") as f:
        f.write(os.urandom(SIZE))
    await d.blockdev_file(name, img)


async def export(d: Exportd, workdir: Path, eid: str, node: str) -> Path:
    mnt = workdir / f"{eid}.raw"
    mnt.touch()
    await d.add_export(eid, node, mnt, writable=True)
    return mnt


async def test_iops_limit_shared_by_a_group_and_others_keep_their_speed(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await d.cmd("object-add", {"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": IOPS_LIMIT}})
    for name in ("a", "b", "fast"):
        await image_node(d, workdir, f"{name}-file")
    for name in ("a", "b"):
        await d.cmd("blockdev-add", {"driver": "throttle", "node-name": name, "throttle-group": "tg",
                                     "file": f"{name}-file"})
    mnt = {name: await export(d, workdir, name, node)
           for name, node in (("a", "a"), ("b", "b"), ("fast", "fast-file"))}
    alone = (await fio(fio_job("fast", mnt["fast"], "randread", "4k", depth=4)))["fast"]
    jobs = await fio(fio_job("a", mnt["a"], "randread", "4k", depth=16),
                     fio_job("b", mnt["b"], "randread", "4k", depth=16),
                     fio_job("fast", mnt["fast"], "randread", "4k", depth=4))
    a, b, fast = iops(jobs["a"]), iops(jobs["b"]), iops(jobs["fast"])
    print(f"IOPS: a {a:.0f} + b {b:.0f} = {a + b:.0f} (limit {IOPS_LIMIT}); unthrottled alone "
          f"{iops(alone):.0f}, beside them {fast:.0f}; load {os.getloadavg()}")
    assert 0.9 * IOPS_LIMIT <= a + b <= 1.1 * IOPS_LIMIT
    assert 0.3 <= a / (a + b) <= 0.7  # the group serves its nodes in turn
    assert fast >= 0.5 * iops(alone)  # generous: the machine is shared
    assert fast > 5 * IOPS_LIMIT  # and far from throttled
    for eid in ("a", "b", "fast"):
        await d.del_export(eid)


async def test_bandwidth_limit(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await d.cmd("object-add", {"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": BPS_LIMIT}})
    await image_node(d, workdir, "file")
    await d.cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "tg", "file": "file"})
    mnt = await export(d, workdir, "e", "t")
    job = (await fio(fio_job("w", mnt, "randrw", "64k", depth=8)))["w"]
    bw = bandwidth(job)
    print(f"bandwidth {bw / M:.2f} MiB/s (limit {BPS_LIMIT / M:.0f}); load {os.getloadavg()}")
    assert 0.9 * BPS_LIMIT <= bw <= 1.1 * BPS_LIMIT
    await d.del_export("e")
