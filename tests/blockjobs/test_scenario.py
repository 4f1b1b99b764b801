"""A libvirt-style life of one disk, driven with the qemu.qmp library
while a program keeps the exported file open and writes to it:
create and export a base image; snapshot it to an overlay; write; commit
the overlay back (active commit, job-complete); mirror the disk to a new
image and pivot; snapshot again and stream the chain into the overlay;
resize. After every step the export's content equals a model, the same
descriptor still works, and the mount is still there."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.threads import athread

M = 1 << 20


class Disk:
    """The open export file and the model of what it must contain."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.model = bytearray(size)
        self.rng = random.Random(12)

    async def write_some(self, n: int = 8) -> None:
        for _ in range(n):
            off = self.rng.randrange(0, len(self.model) - 65536) & ~4095
            data = bytes([self.rng.randrange(256)]) * self.rng.choice((4096, 65536))
            assert await athread(os.pwrite, self.fd, data, off) == len(data)
            self.model[off:off + len(data)] = data

    async def check(self, mnt: Path) -> None:
        assert mounted(mnt)
        size = os.fstat(self.fd).st_size
        assert size == len(self.model)
        assert await athread(os.pread, self.fd, size, 0) == self.model


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def backing_of(img: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                     capture_output=True, text=True, check=True).stdout)
    return info.get("backing-filename")


async def until_null(exportd: Exportd, job_id: str) -> None:
    while True:
        ev = await exportd.event("JOB_STATUS_CHANGE", timeout=60)
        if ev["id"] == job_id and ev["status"] == "null":
            return


async def test_a_disk_through_snapshot_commit_mirror_stream_resize(exportd: Exportd, workdir: Path) -> None:
    q = exportd.cmd
    base, ovl, mid, copy, ovl2 = (workdir / n for n in ("base.qcow2", "ovl.qcow2", "mid.qcow2", "copy.qcow2",
                                                         "ovl2.qcow2"))
    size = 16 * M
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    await q("blockdev-add", {"driver": "qcow2", "node-name": "base",
                             "file": {"driver": "file", "filename": str(base)}})
    mnt = workdir / "disk.raw"
    mnt.touch()
    await exportd.add_export("e", "base", mnt, writable=True)
    fd = await athread(os.open, str(mnt), os.O_RDWR)
    disk = Disk(fd, size)
    try:
        await disk.write_some()
        await disk.check(mnt)

        # 1. snapshot while the file is open; the next writes land in the overlay
        await q("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": str(ovl),
                                           "snapshot-node-name": "ovl"})
        assert [e["node-name"] for e in await exportd.exports()] == ["ovl"]
        await disk.write_some()
        await disk.check(mnt)

        # 2. active commit of the overlay into base, pivot with job-complete
        await q("block-commit", {"job-id": "commit", "device": "ovl"})
        await exportd.event("BLOCK_JOB_READY", timeout=60)
        await disk.write_some(4)  # mirrored into base
        await q("job-complete", {"id": "commit"})
        await until_null(exportd, "commit")
        assert [e["node-name"] for e in await exportd.exports()] == ["base"]
        await disk.write_some()
        await disk.check(mnt)

        # 3. mirror the whole chain (base and a new overlay) to one new image and pivot to it
        await q("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": str(mid),
                                           "snapshot-node-name": "mid"})
        await disk.write_some()
        await disk.check(mnt)
        await q("drive-mirror", {"job-id": "mirror", "device": "mid", "target": str(copy), "sync": "full",
                                 "node-name": "copy"})
        await exportd.event("BLOCK_JOB_READY", timeout=60)
        await disk.write_some(4)
        await q("block-job-complete", {"device": "mirror"})
        await until_null(exportd, "mirror")
        assert [e["node-name"] for e in await exportd.exports()] == ["copy"]
        await disk.write_some()
        await disk.check(mnt)
        assert backing_of(copy) is None

        # 4. a new overlay, then stream the chain into it: it stands alone
        await q("blockdev-snapshot-sync", {"node-name": "copy", "snapshot-file": str(ovl2),
                                           "snapshot-node-name": "ovl2"})
        await disk.write_some()
        await q("block-stream", {"job-id": "stream", "device": "ovl2"})
        await disk.write_some(4)  # while streaming
        await until_null(exportd, "stream")
        await disk.check(mnt)
        assert backing_of(ovl2) is None

        # 5. grow the disk: the open descriptor sees the new size at once
        await q("block_resize", {"node-name": "ovl2", "size": size + 8 * M})
        disk.model.extend(bytes(8 * M))
        await disk.write_some()
        await disk.check(mnt)
    finally:
        await athread(os.close, fd)
    await exportd.del_export("e")
    await q("blockdev-del", {"node-name": "base"})
    for img in (base, mid, copy, ovl2):
        assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0
    raw = workdir / "final.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(ovl2), str(raw)], check=True)
    assert raw.read_bytes() == disk.model
