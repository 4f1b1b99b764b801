"""kill -9 of the daemon leaves dead mounts (stat gives ENOTCONN); a new
daemon cleans them when asked to export on the same mountpoints again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.mounts import fuse_mounts_under
from tests.support.threads import athread


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
        return 0
    except OSError as e:
        return e.errno or -1


async def test_kill9_then_restart_cleans_stale_mounts(workdir: Path) -> None:
    images = []
    for i in range(3):
        img = workdir / f"img{i}.raw"
        images.append((img, make_image(img, 256 * 1024, seed=i)))
        (workdir / f"mnt{i}.raw").touch()

    first = Exportd(workdir)
    await first.start()
    try:
        for i, (img, _) in enumerate(images):
            await first.blockdev_file(f"f{i}", img)
            # one of them mounted over its own image file
            mnt = img if i == 2 else workdir / f"mnt{i}.raw"
            await first.add_export(f"e{i}", f"f{i}", mnt, writable=(i == 1))
        await first.disconnect()
        first.kill9()
    finally:
        await first.stop()

    stale = fuse_mounts_under(str(workdir))
    assert len(stale) == 3
    for path in (workdir / "mnt0.raw", workdir / "mnt1.raw", images[2][0]):
        # ENOTCONN; ECONNABORTED when the dead daemon served through
        # FUSE over io_uring (the kernel ends its ring that way)
        assert await athread(stat_errno, path) in (errno.ENOTCONN, errno.ECONNABORTED)

    second = Exportd(workdir)
    await second.start()
    try:
        for i, (img, data) in enumerate(images[:2]):
            await second.blockdev_file(f"f{i}", img)
            await second.add_export(f"e{i}", f"f{i}", workdir / f"mnt{i}.raw", writable=True)
            assert await athread((workdir / f"mnt{i}.raw").read_bytes) == data
        # the image the dead daemon had mounted over: its path still names the
        # dead mount, which any export on that path cleans away first
        await second.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 4096})
        await second.add_export("e2", "n", images[2][0])
        assert await athread(images[2][0].read_bytes) == bytes(4096)
        await second.del_export("e2")
        assert await athread(images[2][0].read_bytes) == images[2][1]
        assert len(fuse_mounts_under(str(workdir))) == 2
        await second.quit()
    finally:
        await second.stop()
    assert fuse_mounts_under(str(workdir)) == []
