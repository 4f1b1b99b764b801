"""16 exports in one daemon under concurrent fio load with verification:
no corruption, no stall. Four of them are growable raw exports of plain
files (served by the kernel through passthrough when available), the rest
are served by the daemon."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun, have

N = 16
SIZE = 4 << 20

pytestmark = pytest.mark.skipif(not have("fio"), reason="fio missing")


async def test_sixteen_exports_under_fio_verify(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    jobs: list[str] = []
    for i in range(N):
        img = workdir / f"img{i}.raw"
        with open(img, "wb") as f:
            f.truncate(SIZE)
        mnt = workdir / f"mnt{i}.raw"
        mnt.touch()
        await d.blockdev_file(f"f{i}", img)
        node = f"f{i}"
        if i % 4 == 1:  # some through a raw format node
            await d.cmd("blockdev-add", {"driver": "raw", "node-name": f"r{i}", "file": f"f{i}"})
            node = f"r{i}"
        await d.add_export(f"e{i}", node, mnt, writable=True, growable=(i % 4 == 3))
        jobs += [
            f"--name=j{i}",
            f"--filename={mnt}",
            f"--rw={'randrw' if i % 2 else 'write'}",
            f"--bs={'4k' if i % 2 else '64k'}",
        ]
    exports = await d.exports()
    assert len(exports) == N
    cmd = [
        "fio", "--output-format=terse", "--ioengine=psync", f"--size={SIZE}",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0",
        "--verify_state_save=0", "--thread", *jobs,
    ]
    try:
        r = await arun(cmd, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("fio stalled on the exports")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # the data fio verified through the mounts is really in the images
    for i in (0, 3):
        r = await arun(["cmp", str(workdir / f"mnt{i}.raw"), str(workdir / f"img{i}.raw")])
        assert r.returncode == 0, r.stdout + r.stderr
    # still alive and answering
    assert len(await d.exports()) == N
