"""blockdev-mirror on a live FUSE export: writes during the copy reach the
target, job-complete moves the export onto the target with no unmount, and
a soft cancel after READY leaves the source in place with a consistent copy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.threads import athread

MiB = 1 << 20


def qcow2(path: Path, size: int, *cmds: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    for c in cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, str(path)], check=True, capture_output=True)


def check_clean(*images: Path) -> None:
    for img in images:
        r = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, (img, r.stdout, r.stderr)


async def exported_source(exportd: Exportd, workdir: Path, size: int, *writes: str) -> tuple[Path, Path, Path]:
    """Nodes src (with `writes`) and an empty dst of `size`, src exported writable."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    qcow2(src, size, *writes)
    qcow2(dst, size)
    for name, img in (("src", src), ("dst", dst)):
        await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                           "file": {"driver": "file", "filename": str(img)}})
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "src", mnt, writable=True)
    return src, dst, mnt


async def test_mirror_pivots_a_live_export(exportd: Exportd, workdir: Path) -> None:
    src, dst, mnt = await exported_source(exportd, workdir, 8 * MiB, "write -P 0x61 0 4M")
    fd = await athread(os.open, str(mnt), os.O_RDWR)
    try:
        await exportd.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst", "sync": "full"})
        await athread(os.pwrite, fd, b"b" * MiB, 6 * MiB)  # during the copy
        assert await exportd.event("BLOCK_JOB_READY", timeout=30)
        await athread(os.pwrite, fd, b"c" * 4096, 0)  # after READY: mirrored
        jobs = await exportd.cmd("query-block-jobs")
        assert [(j["device"], j["status"], j["ready"]) for j in jobs] == [("m", "ready", True)]
        await exportd.cmd("job-complete", {"id": "m"})
        done = await exportd.event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done, done
        exports = await exportd.exports()
        assert [(e["id"], e["node-name"]) for e in exports] == [("e", "dst")]
        await athread(os.pwrite, fd, b"d" * 4096, 4096)  # after the pivot: to dst only
        await athread(os.fsync, fd)
        data = await athread(os.pread, fd, 8 * MiB, 0)
    finally:
        await athread(os.close, fd)
    expect = bytearray(b"a" * 4 * MiB + bytes(4 * MiB))
    expect[6 * MiB:7 * MiB] = b"b" * MiB
    expect[0:4096] = b"c" * 4096
    expect[4096:8192] = b"d" * 4096
    assert data == expect
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "dst"})
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    check_clean(src, dst)
    raw = workdir / "dst.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(dst), str(raw)], check=True)
    assert raw.read_bytes() == expect
    # the source has everything up to the pivot, not the write after it
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(raw)], check=True)
    before = bytearray(expect)
    before[4096:8192] = b"a" * 4096
    assert raw.read_bytes() == before


async def test_soft_cancel_after_ready_keeps_the_source(exportd: Exportd, workdir: Path) -> None:
    src, dst, mnt = await exported_source(exportd, workdir, 4 * MiB, "write -P 0x61 0 1M")
    await exportd.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst", "sync": "full"})
    await exportd.event("BLOCK_JOB_READY", timeout=30)
    await athread(_write_at, mnt, 2 * MiB, b"z" * 8192)
    await exportd.cmd("block-job-cancel", {"device": "m"})
    done = await exportd.event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done
    assert [(e["id"], e["node-name"]) for e in await exportd.exports()] == [("e", "src")]
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "dst"})
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    check_clean(src, dst)
    r = subprocess.run(["qemu-img", "compare", "-q", str(src), str(dst)])
    assert r.returncode == 0


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


async def test_sync_none_copies_exactly_the_new_writes(exportd: Exportd, workdir: Path) -> None:
    src, dst, mnt = await exported_source(exportd, workdir, 4 * MiB, "write -P 0x61 0 4M")
    await exportd.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst", "sync": "none"})
    await athread(_write_at, mnt, MiB, b"n" * 8192)  # at once, before or as the job starts
    await exportd.event("BLOCK_JOB_READY", timeout=30)
    await athread(_write_at, mnt, 3 * MiB, b"m" * 4096)
    await exportd.cmd("job-complete", {"id": "m"})
    assert "error" not in await exportd.event("BLOCK_JOB_COMPLETED", timeout=30)
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "dst"})
    await exportd.cmd("blockdev-del", {"node-name": "src"})
    raw = workdir / "dst.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(dst), str(raw)], check=True)
    # dst has no backing: only the chunks written since the start, whole
    # (the default granularity is dst's cluster size, 64 KiB, as QEMU's)
    expect = bytearray(4 * MiB)
    expect[MiB:MiB + 65536] = b"n" * 8192 + b"a" * (65536 - 8192)
    expect[3 * MiB:3 * MiB + 65536] = b"m" * 4096 + b"a" * (65536 - 4096)
    assert raw.read_bytes() == expect
    check_clean(src, dst)
