"""Rules the daemon enforces itself, where the kernel usually answers first
(a read-only export is mounted `ro`; the VFS checks fallocate modes), so they
cannot be seen through the mount: checked by calling the export's file
handlers directly, on a real export of a real file node, as QEMU's
fuse.c answers them."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from exportd.fuse.filesystem import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    SEEK_DATA,
    SEEK_HOLE,
    SetAttr,
)
from tests.support.host import Host, add
from tests.support.images import make_image


@pytest.fixture
async def host_with_file(workdir: Path):  # noqa: ANN201
    h = Host()
    make_image(workdir / "img.raw", 65536)
    await h.graph.add({"driver": "file", "node-name": "null0", "filename": str(workdir / "img.raw")})
    try:
        yield h
    finally:
        await h.exports.shutdown_all()
        await h.graph.close_all()


async def expect_errno(code: int, coro) -> None:  # noqa: ANN001
    with pytest.raises(OSError) as e:
        await coro
    assert e.value.errno == code, e.value


async def test_read_only_export_rules(host_with_file: Host, workdir: Path) -> None:
    exp = await add(host_with_file, workdir, "ro")
    f = exp.file
    await expect_errno(errno.EACCES, f.setattr(SetAttr(size=0)))
    await expect_errno(errno.EROFS, f.setattr(SetAttr(mode=0o600)))
    await expect_errno(errno.EACCES, f.write(0, 0, memoryview(b"x")))
    await expect_errno(errno.EACCES, f.fallocate(0, 0, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
    await expect_errno(errno.EACCES, f.open(2))  # O_RDWR
    attr = await f.setattr(SetAttr(mode=0o500))  # dropping bits is fine
    assert attr.mode & 0o7777 == 0o500 and attr.size == 65536


async def test_writable_export_rules(host_with_file: Host, workdir: Path) -> None:
    exp = await add(host_with_file, workdir, "rw", writable=True, **{"allow-other": "off"})
    f = exp.file
    await expect_errno(errno.EINVAL, f.fallocate(0, 0, 4096, FALLOC_FL_PUNCH_HOLE))
    await expect_errno(errno.EOPNOTSUPP, f.fallocate(0, 0, 4096, FALLOC_FL_COLLAPSE_RANGE))
    await expect_errno(errno.EOPNOTSUPP, f.fallocate(0, 0, 4096, 0))
    await expect_errno(errno.EPERM, f.setattr(SetAttr(mode=0o644)))
    await expect_errno(errno.ENOTSUP, f.setattr(SetAttr(uid=1)))
    await expect_errno(errno.EINVAL, f.lseek(0, 0, 0))  # SEEK_SET is the kernel's
    assert await f.lseek(0, 0, SEEK_DATA) == 0
    assert await f.lseek(0, 0, SEEK_HOLE) == 65536
    await expect_errno(errno.ENXIO, f.lseek(0, 65536, SEEK_DATA))
    assert await f.lseek(0, 65536, SEEK_HOLE) == 65536
    await expect_errno(errno.ENXIO, f.lseek(0, 65537, SEEK_HOLE))
    # a failed request changes nothing, and the temporary RESIZE is gone again
    assert (await f.getattr()).size == 65536
    await f.setattr(SetAttr(size=4096))
    assert exp.edge is not None and not exp.edge.perm & 0x08


async def test_growing_writes_finishing_out_of_order_never_shrink(
    host_with_file: Host, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writes past the end grow the file; the nearer growth is made to
    # finish last. It must not truncate the file below the farther write.
    exp = await add(host_with_file, workdir, "g", writable=True, growable=True, **{"allow-other": "off"})
    node = exp.node
    real_truncate = node.truncate
    calls = 0

    async def first_truncate_slow(size: int, **kw):  # noqa: ANN202, ANN003
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.05)
        return await real_truncate(size, **kw)

    monkeypatch.setattr(node, "truncate", first_truncate_slow)
    end = 65536
    near = asyncio.create_task(exp.file.write(0, end + 100, memoryview(b"a" * 100)))
    await asyncio.sleep(0)
    far = asyncio.create_task(exp.file.write(0, end + 1000, memoryview(b"b" * 100)))
    assert await asyncio.gather(near, far) == [100, 100]
    assert exp.current_length() == end + 1100
    tail = await node.read(end, 1100)
    assert bytes(tail) == bytes(100) + b"a" * 100 + bytes(800) + b"b" * 100
