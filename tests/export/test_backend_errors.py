"""Backend I/O errors reach the reader as EIO, the daemon reports them with
BLOCK_IO_ERROR, and it keeps serving.

The failing backend is real: daemon A exports a file node whose file is
daemon B's FUSE export; B is killed, so every read A makes fails."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.threads import athread


def read_errno(path: Path) -> int | bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError as e:
        return e.errno or -1


def write_errno(path: Path) -> int:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0
    except OSError as e:
        return e.errno or -1


async def test_backend_error_is_eio(workdir: Path) -> None:
    img = workdir / "img.raw"
    data = make_image(img, 1 << 20)
    mnt_b = workdir / "b.raw"
    mnt_a = workdir / "a.raw"
    mnt_b.touch()
    mnt_a.touch()
    (workdir / "b").mkdir()
    (workdir / "a").mkdir()
    b = Exportd(workdir / "b")
    a = Exportd(workdir / "a")
    await b.start()
    try:
        await b.blockdev_file("f", img)
        await b.add_export("b", "f", mnt_b, writable=True)
        await a.start()
        await a.blockdev_file("f", mnt_b)  # A's backend is B's export
        await a.add_export("a", "f", mnt_a, writable=True)
        assert await athread(read_errno, mnt_a) == data[:4096]

        await b.disconnect()
        b.kill9()
        assert await athread(read_errno, mnt_a) == errno.EIO
        assert await athread(write_errno, mnt_a) == errno.EIO
        # and the management hears of it (QEMU's BLOCK_IO_ERROR, action report)
        for operation in ("read", "write"):
            event = await a.event("BLOCK_IO_ERROR")
            reason = event.pop("reason")
            assert event == {"device": "", "node-name": "f", "operation": operation, "action": "report"}
            assert reason == os.strerror(errno.ENOTCONN), reason
        # the daemon stays up and the export can be removed cleanly
        await asyncio.wait_for(a.cmd("query-version"), 5)
        assert [e["id"] for e in await a.exports()] == ["a"]
        await a.del_export("a")
        await a.quit()
    finally:
        await a.stop()
        await b.stop()
