"""Writes to a FUSE export are never lost while a block job works under
it: fio writes with verification through the export while a mirror (both
copy modes), an active commit or a stream runs and (for the first two)
pivots in the middle of fio's write phase; fio then reads everything back
through the export, which by then sits on the new node. Afterwards the
images hold what the export showed, and qemu-img check is clean."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun, have

pytestmark = pytest.mark.skipif(not have("fio"), reason="fio missing")

M = 1 << 20
SIZE = 24 * M


def qcow2(path: Path, *, backing: Path | None = None, writes: tuple[str, ...] = ()) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), str(SIZE)], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True, capture_output=True)


def fio(mnt: Path) -> list[str]:
    # the write phase lasts ~3 s (rate-limited), so the job's pivot falls inside it
    return ["fio", "--name=w", f"--filename={mnt}", "--rw=randwrite", "--bs=4k", f"--size={SIZE}",
            "--ioengine=psync", "--rate_iops=2500", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--randrepeat=0", "--verify_state_save=0", "--output-format=terse"]


def raw_of(img: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)], check=True)
    return out.read_bytes()


def check(*images: Path) -> None:
    for img in images:
        r = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, (img, r.stdout)


CASES: dict[str, dict[str, Any]] = {
    "mirror": {"cmd": "blockdev-mirror", "args": {"device": "top", "target": "dst", "sync": "full"},
               "pivot": True, "lands_in": "dst.qcow2"},
    "mirror-write-blocking": {"cmd": "blockdev-mirror", "pivot": True, "lands_in": "dst.qcow2",
                              "args": {"device": "top", "target": "dst", "sync": "full",
                                       "copy-mode": "write-blocking"}},
    "active-commit": {"cmd": "block-commit", "args": {"device": "top"}, "pivot": True, "lands_in": "base.qcow2"},
    "stream": {"cmd": "block-stream", "args": {"device": "top"}, "pivot": False, "lands_in": "top.qcow2"},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_fio_verify_through_a_job(exportd: Exportd, workdir: Path, case: str) -> None:
    c = CASES[case]
    base, top, dst = workdir / "base.qcow2", workdir / "top.qcow2", workdir / "dst.qcow2"
    qcow2(base, writes=("write -P 0x11 0 8M",))
    qcow2(top, backing=base, writes=("write -P 0x22 4M 4M",))
    qcow2(dst)
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "base", "read-only": False,
                                       "file": {"driver": "file", "filename": str(base)}})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                                       "file": {"driver": "file", "filename": str(top)}})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "dst",
                                       "file": {"driver": "file", "filename": str(dst)}})
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "top", mnt, writable=True)
    writer = asyncio.ensure_future(arun(fio(mnt), timeout=120))
    await asyncio.sleep(0.5)  # fio is writing
    await exportd.cmd(c["cmd"], {"job-id": "j", **c["args"]})
    if c["pivot"]:
        await exportd.event("BLOCK_JOB_READY", timeout=60)
        assert not writer.done(), "fio finished before the pivot: the test would prove nothing"
        await exportd.cmd("job-complete", {"id": "j"})
    done = await exportd.event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done, done
    r = await writer
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    shown = (await arun(["sha256sum", str(mnt)])).stdout.split()[0]
    await exportd.del_export("e")
    for node in ("dst", "top", "base"):
        await exportd.cmd("blockdev-del", {"node-name": node})
    check(base, top, dst)
    landed = raw_of(workdir / c["lands_in"], workdir / "landed.raw")
    assert __import__("hashlib").sha256(landed).hexdigest() == shown
