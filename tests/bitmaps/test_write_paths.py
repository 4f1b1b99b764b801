"""Every way a write reaches a node marks its dirty bitmaps: FUSE writes
(the in-place fast path on raw files and allocated qcow2 clusters, and the
slow path), fallocate zeroing and punching, truncate growth, and a mirror
job's writes to its target. Writes go from another process, as the rules
for exported files demand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun

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
