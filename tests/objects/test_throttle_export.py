"""Requests waiting in a throttle group do not hold up the end of an
export: a hard block-export-del, and quit, finish at once while reads wait
for a group that lets one through per second."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.mounts import fuse_mounts_under


async def slow_export(d: Exportd, workdir: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    img, mnt = workdir / "disk.img", workdir / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    mnt.touch()
    await d.cmd("object-add", {"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 1}})
    await d.blockdev_file("f", img)
    await d.cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "tg", "file": "f"})
    await d.add_export("e", "t", mnt)
    reader = subprocess.Popen(["dd", f"if={mnt}", "of=/dev/null", "bs=4k", "iflag=direct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(1.5)  # a read waits in the group now
    assert reader.poll() is None
    return mnt, reader


def stop(reader: subprocess.Popen[bytes]) -> None:
    if reader.poll() is None:
        reader.kill()
    reader.wait(10)


async def test_hard_delete_while_reads_wait(exportd: Exportd, workdir: Path) -> None:
    _, reader = await slow_export(exportd, workdir)
    try:
        t0 = time.monotonic()
        await exportd.del_export("e", mode="hard")
        assert time.monotonic() - t0 < 1.0
        assert not fuse_mounts_under(str(workdir))
        await exportd.cmd("blockdev-del", {"node-name": "t"})
        await exportd.cmd("object-del", {"id": "tg"})
    finally:
        stop(reader)


async def test_quit_while_reads_wait(exportd: Exportd, workdir: Path) -> None:
    _, reader = await slow_export(exportd, workdir)
    try:
        t0 = time.monotonic()
        await exportd.quit()
        assert time.monotonic() - t0 < 5.0
        assert exportd.proc is not None and exportd.proc.returncode == 0
        assert not fuse_mounts_under(str(workdir))
    finally:
        stop(reader)
