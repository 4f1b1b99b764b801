"""Every way a write reaches a node marks its dirty bitmaps: FUSE writes
(the in-place fast path on raw files and allocated qcow2 clusters, and the
slow path), fallocate zeroing and punching, truncate growth, and a mirror
job's writes to its target. Writes go from another process, as the rules
for exported files demand."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.support.daemon import Exportd
from tests.support.programs import arun
from tests.support.threads import athread

G = 65536


async def count(exportd: Exportd, node: str, name: str) -> int:
    for n in await exportd.cmd("query-named-block-nodes"):
        if n["node-name"] == node:
            return next(b["count"] for b in n["dirty-bitmaps"] if b["name"] == name)
    raise AssertionError(node)


async def io(path: Path, code: str) -> None:
    """Run `code` with `f` open on the exported file, in a child process."""
    script = f"import os\nf = os.open({str(path)!r}, os.O_RDWR)\n{code}\nos.close(f)\n"
    r = await arun([sys.executable, "-c", script])
    assert r.returncode == 0, r.stderr


async def fallocate(path: Path, mode: str, offset: int, length: int) -> None:
    r = await arun(["fallocate", mode, "-o", str(offset), "-l", str(length), str(path)])
    assert r.returncode == 0, r.stderr


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """Images on tmpfs: only there are writes done in place on the loop."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="exportd-bitmaps-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_fuse_writes_mark(exportd: Exportd, workdir: Path, shm_dir: Path, fmt: str) -> None:
    img = shm_dir / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "8M"], check=True)
    if fmt == "qcow2":  # some clusters already ours: writes there go in place
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write 0 1M", str(img)], check=True, capture_output=True)
    await exportd.cmd("blockdev-add", {"driver": fmt, "node-name": "d", "discard": "unmap",
                                       "file": {"driver": "file", "filename": str(img)}})
    await exportd.cmd("block-dirty-bitmap-add", {"node": "d", "name": "b"})
    await exportd.cmd("block-dirty-bitmap-add", {"node": "d", "name": "off", "disabled": True})
    mnt = workdir / "disk.mnt"
    mnt.touch()
    await exportd.add_export("e", "d", mnt, writable=True, growable=True)
    try:
        await io(mnt, "os.pwrite(f, b'x' * 4096, 8192)")  # allocated (qcow2) or a plain file: in place
        assert await count(exportd, "d", "b") == G
        await io(mnt, "os.pwrite(f, b'y' * 100, 3 * 65536 + 10)")
        assert await count(exportd, "d", "b") == 2 * G
        await io(mnt, "os.pwrite(f, b'z' * 4096, 5 << 20)")  # unallocated in qcow2: the slow path
        assert await count(exportd, "d", "b") == 3 * G
        await fallocate(mnt, "--zero-range", 6 << 20, 2 * 65536)
        assert await count(exportd, "d", "b") == 5 * G
        await fallocate(mnt, "--punch-hole", 7 << 20, 65536)
        assert await count(exportd, "d", "b") == 6 * G
        await io(mnt, "os.ftruncate(f, (8 << 20) + 2 * 65536)")  # growth: the new range reads zeroes
        assert await count(exportd, "d", "b") == 8 * G
        assert await count(exportd, "d", "off") == 0
        await exportd.cmd("block-dirty-bitmap-clear", {"node": "d", "name": "b"})
        await exportd.cmd("block-dirty-bitmap-enable", {"node": "d", "name": "off"})
        await io(mnt, "os.pwrite(f, b'x' * 4096, 8192)")
        assert await count(exportd, "d", "b") == G and await count(exportd, "d", "off") == G
    finally:
        await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "d"})


async def test_mirror_target_marks(exportd: Exportd, workdir: Path) -> None:
    src, dst = workdir / "src.raw", workdir / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 256k", str(src)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), "4M"], check=True)
    await exportd.cmd("blockdev-add", {"driver": "raw", "node-name": "src",
                                       "file": {"driver": "file", "filename": str(src)}})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "dst",
                                       "file": {"driver": "file", "filename": str(dst)}})
    await exportd.cmd("block-dirty-bitmap-add", {"node": "dst", "name": "b"})
    await exportd.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst", "sync": "full"})
    await exportd.event("BLOCK_JOB_READY", timeout=30)
    await exportd.cmd("block-job-cancel", {"device": "m"})
    await exportd.event("BLOCK_JOB_COMPLETED", timeout=30)
    # the data it copied, at least; zeroes the target already read are skipped or written
    assert await count(exportd, "dst", "b") >= 4 * G
    for node in ("dst", "src"):
        await exportd.cmd("blockdev-del", {"node-name": node})



async def released(exportd: Exportd, command: str, args: dict) -> None:
    """Run `command`, which waits for files just closed: the kernel sends
    their RELEASE after close() has returned."""
    for _ in range(100):
        try:
            await exportd.cmd(command, args)
            return
        except ExecuteError as e:
            if "FUSE passthrough" not in e.error.error.desc:
                raise
        await asyncio.sleep(0.01)
    await exportd.cmd(command, args)


async def test_files_open_by_passthrough_hold_off_recording(exportd: Exportd, workdir: Path) -> None:
    """The kernel writes a file opened by FUSE passthrough itself: no bitmap
    can see those writes, so none may start recording below such a file
    while it is open, and the export may not move under it. Later opens go
    through the daemon and are marked."""
    img = workdir / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "4M"], check=True)
    await exportd.cmd("blockdev-add", {"driver": "raw", "node-name": "d",
                                       "file": {"driver": "file", "node-name": "f", "filename": str(img)}})
    mnt = workdir / "disk.mnt"
    mnt.touch()
    await exportd.add_export("e", "d", mnt, writable=True, growable=True)
    snapshot = {"node-name": "d", "format": "qcow2", "snapshot-file": str(workdir / "ovl.qcow2"),
                "snapshot-node-name": "ovl"}
    try:
        (info,) = await exportd.exports()
        if not info["passthrough"]:
            pytest.skip("no FUSE passthrough on this machine")
        writer = await athread(os.open, str(mnt), os.O_RDWR)
        reader = await athread(os.open, str(mnt), os.O_RDONLY)
        try:
            for node in ("d", "f"):  # the export's node and the one below it
                err = await exportd.error("block-dirty-bitmap-add", {"node": node, "name": "b"})
                assert err == ("Export 'e' has 1 file(s) open for writing through FUSE passthrough, whose "
                               f"writes the dirty bitmaps of node '{node}' would miss; close them first, "
                               "or use passthrough=off")
            await exportd.cmd("block-dirty-bitmap-add", {"node": "d", "name": "off", "disabled": True})
            err = await exportd.error("block-dirty-bitmap-enable", {"node": "d", "name": "off"})
            assert "1 file(s) open for writing through FUSE passthrough" in err
            err = await exportd.error("blockdev-snapshot-sync", snapshot)
            assert err == ("Export 'e' has 2 file(s) open through FUSE passthrough on its image file and "
                           "cannot move to 'ovl' until they are closed")
            assert await athread(os.pwrite, writer, b"w" * 4096, 0) == 4096
            await athread(os.close, writer)
            writer = -1
            # a reader left: bitmaps may record, the export still may not move
            await released(exportd, "block-dirty-bitmap-enable", {"node": "d", "name": "off"})
            await exportd.cmd("block-dirty-bitmap-add", {"node": "d", "name": "b"})
            assert "1 file(s) open through FUSE passthrough" in await exportd.error("blockdev-snapshot-sync",
                                                                                     snapshot)
        finally:
            for fd in (writer, reader):
                if fd >= 0:
                    await athread(os.close, fd)
        await io(mnt, "os.pwrite(f, b'x' * 4096, 3 * 65536)")  # opened after: through the daemon
        assert await count(exportd, "d", "b") == G and await count(exportd, "d", "off") == G
        await released(exportd, "blockdev-snapshot-sync", snapshot)
        (info,) = await exportd.exports()
        assert info["node-name"] == "ovl" and info["passthrough"] is False
        await io(mnt, "assert os.pread(f, 4096, 0) == b'w' * 4096; os.pwrite(f, b'o' * 4096, 65536)")
        assert await count(exportd, "d", "b") == G  # the write went to the overlay
    finally:
        await exportd.del_export("e")
