"""The FUSE export's file semantics (issue 5, "Semantics"), each one checked
through a real mount of a real exportd process, with the image file itself
as the oracle."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import time
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.programs import arun
from tests.support.threads import athread

SIZE = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with any mode; returns 0 or the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            return ctypes.get_errno()
        return 0
    finally:
        os.close(fd)


async def export_image(
    d: Exportd, workdir: Path, size: int = SIZE, *, sparse: bool = False, node_opts: dict | None = None,
    **export_opts: object,
) -> tuple[Path, Path, bytes]:
    img = workdir / "img.raw"
    mnt = workdir / "mnt.raw"
    data = make_image(img, size, sparse=sparse)
    mnt.touch()
    await d.blockdev_file("file0", img, **(node_opts or {}))
    await d.add_export("exp0", "file0", mnt, **export_opts)
    return img, mnt, data


async def test_attributes(exportd: Exportd, workdir: Path) -> None:
    size = SIZE + 123  # not a multiple of anything
    img, mnt, _ = await export_image(exportd, workdir, size, writable=True)
    before = time.time()
    st = await athread(os.stat, mnt)
    assert st.st_size == size
    assert oct(st.st_mode & 0o7777) == oct(0o600)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    # blocks follow the image's allocation, in 512-byte units
    assert st.st_blocks == -(-img.stat().st_blocks * 512 // 512)
    assert st.st_blksize >= 1
    assert abs(st.st_mtime - before) < 5 and abs(st.st_ctime - before) < 5
    # times are not stored: touch is accepted, times still read as now
    r = await arun(["touch", "-d", "2001-01-01", str(mnt)])
    assert r.returncode == 0, r.stderr
    assert abs((await athread(os.stat, mnt)).st_mtime - time.time()) < 5
    # size stays current after a change
    r = await arun(["truncate", "-s", str(size + 4096), str(mnt)])
    assert r.returncode == 0, r.stderr
    assert (await athread(os.stat, mnt)).st_size == size + 4096 == img.stat().st_size


async def test_read_only_attributes(exportd: Exportd, workdir: Path) -> None:
    _, mnt, _ = await export_image(exportd, workdir)
    st = await athread(os.stat, mnt)
    assert oct(st.st_mode & 0o7777) == oct(0o400)
    # mounted ro: writes, truncates and chmods are refused by the kernel
    r = await arun(["truncate", "-s", "0", str(mnt)])
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    r = await arun(["grep", " ro,", "/proc/self/mountinfo"])
    assert str(mnt) in r.stdout


async def test_chmod_without_allow_other(exportd: Exportd, workdir: Path) -> None:
    _, mnt, _ = await export_image(exportd, workdir, writable=True, allow_other="off")
    r = await arun(["chmod", "0700", str(mnt)])
    assert r.returncode == 0, r.stderr
    assert oct((await athread(os.stat, mnt)).st_mode & 0o7777) == oct(0o700)
    # group/other bits make no sense when nobody else may access the mount
    r = await arun(["chmod", "0640", str(mnt)])
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    assert oct((await athread(os.stat, mnt)).st_mode & 0o7777) == oct(0o700)
    # chown only with allow_other
    r = await arun(["chown", "65534", str(mnt)])
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r.stderr
    r = await arun(["chgrp", "65534", str(mnt)])
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r.stderr
    # mode is stored & 07777 (setuid etc. kept, file type ignored)
    r = await arun(["chmod", "4600", str(mnt)])
    assert r.returncode == 0, r.stderr
    assert oct((await athread(os.stat, mnt)).st_mode & 0o7777) == oct(0o4600)


async def test_chmod_chown_with_allow_other(exportd: Exportd, workdir: Path) -> None:
    _, mnt, _ = await export_image(exportd, workdir, writable=True, allow_other="on")
    r = await arun(["chmod", "0664", str(mnt)])
    assert r.returncode == 0, r.stderr
    r = await arun(["chown", "65534:65534", str(mnt)])
    assert r.returncode == 0, r.stderr
    st = await athread(os.stat, mnt)
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(0o664), 65534, 65534)


async def test_read_at_and_past_eof(exportd: Exportd, workdir: Path) -> None:
    size = SIZE - 100
    _, mnt, data = await export_image(exportd, workdir, size)

    def reads() -> tuple[bytes, bytes, bytes, bytes]:
        fd = os.open(mnt, os.O_RDONLY)
        try:
            return (
                os.pread(fd, 4096, size - 50),
                os.pread(fd, 4096, size),
                os.pread(fd, 4096, size + 10000),
                os.pread(fd, 7777, 12345),
            )
        finally:
            os.close(fd)

    short, at_eof, past, middle = await athread(reads)
    assert short == data[size - 50 :]
    assert at_eof == b"" and past == b""
    assert middle == data[12345 : 12345 + 7777]


async def test_write_past_eof_not_growable(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True)

    def writes() -> tuple[int, int]:
        fd = os.open(mnt, os.O_WRONLY)
        try:
            crossing = os.pwrite(fd, b"x" * 200, SIZE - 100)
            at_eof = os.pwrite(fd, b"y" * 10, SIZE)
            return crossing, at_eof
        finally:
            os.close(fd)

    crossing, at_eof = await athread(writes)
    assert crossing == 100  # cut short at EOF
    assert at_eof == 0  # nothing at EOF: dd reports "No space left on device"
    assert img.stat().st_size == SIZE
    assert img.read_bytes() == data[: SIZE - 100] + b"x" * 100
    # read-only export: write refused (EACCES from the daemon, EROFS from the ro mount)
    await exportd.add_export("ro", "file0", img)
    r = await arun(["dd", "if=/dev/zero", f"of={img}", "bs=512", "count=1", "conv=notrunc"])
    assert r.returncode != 0 and "Read-only file system" in r.stderr


async def test_write_past_eof_growable(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True, growable=True)

    def write() -> int:
        fd = os.open(mnt, os.O_WRONLY)
        try:
            return os.pwrite(fd, b"z" * 100, SIZE + 4096)
        finally:
            os.close(fd)

    assert await athread(write) == 100
    assert img.stat().st_size == SIZE + 4096 + 100
    assert (await athread(os.stat, mnt)).st_size == SIZE + 4196
    content = img.read_bytes()
    assert content[:SIZE] == data and content[SIZE : SIZE + 4096] == bytes(4096)
    assert content[SIZE + 4096 :] == b"z" * 100


@pytest.mark.parametrize("growable", [False, True])
async def test_open_o_trunc(exportd: Exportd, workdir: Path, growable: bool) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True, growable=growable)

    def open_trunc() -> None:
        os.close(os.open(mnt, os.O_WRONLY | os.O_TRUNC))

    await athread(open_trunc)
    if growable:
        assert img.stat().st_size == 0 and (await athread(os.stat, mnt)).st_size == 0
    else:
        # O_TRUNC only truncates a growable export: the image is untouched
        assert img.stat().st_size == SIZE and img.read_bytes() == data


async def test_truncate_on_writable_export(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True)
    for new in (SIZE // 2, SIZE * 2, SIZE):
        r = await arun(["truncate", "-s", str(new), str(mnt)])
        assert r.returncode == 0, r.stderr
        assert img.stat().st_size == new == (await athread(os.stat, mnt)).st_size
    # growing zero-fills: the shrunk half is gone for good
    assert img.read_bytes() == data[: SIZE // 2] + bytes(SIZE // 2)


async def test_fallocate_rules(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True)
    # mode 0 inside the file: not supported
    assert await athread(fallocate, mnt, 0, 0, 4096) == errno.EOPNOTSUPP
    # keep-size alone, collapse: not supported
    assert await athread(fallocate, mnt, FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EOPNOTSUPP
    assert await athread(fallocate, mnt, FALLOC_FL_COLLAPSE_RANGE, 0, 4096) == errno.EOPNOTSUPP
    # punch hole: zeroes afterwards even though the node ignores discards
    r = await arun(["fallocate", "-p", "-o", "4096", "-l", "8192", str(mnt)])
    assert r.returncode == 0, r.stderr
    expect = bytearray(data)
    expect[4096:12288] = bytes(8192)
    assert img.read_bytes() == expect
    # zero range with keep-size clamps at EOF
    r = await arun(["fallocate", "-z", "-n", "-o", str(SIZE - 4096), "-l", "65536", str(mnt)])
    assert r.returncode == 0, r.stderr
    expect[SIZE - 4096 :] = bytes(4096)
    assert img.stat().st_size == SIZE and img.read_bytes() == expect
    # zero range without keep-size grows the export
    r = await arun(["fallocate", "-z", "-o", str(SIZE - 4096), "-l", "8192", str(mnt)])
    assert r.returncode == 0, r.stderr
    expect += bytes(4096)
    assert img.stat().st_size == SIZE + 4096 and img.read_bytes() == expect
    # mode 0 at EOF really preallocates
    blocks = img.stat().st_blocks
    r = await arun(["fallocate", "-o", str(SIZE + 4096), "-l", str(1 << 20), str(mnt)])
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == SIZE + 4096 + (1 << 20)
    assert img.stat().st_blocks >= blocks + (1 << 20) // 512


async def test_punch_hole_requires_keep_size(exportd: Exportd, workdir: Path) -> None:
    # The kernel refuses this combination itself (EOPNOTSUPP) before asking
    # the daemon, whose own answer would be EINVAL as QEMU's; nothing changes.
    img, mnt, data = await export_image(exportd, workdir, writable=True)
    assert await athread(fallocate, mnt, FALLOC_FL_PUNCH_HOLE, 0, 4096) in (
        errno.EOPNOTSUPP, errno.EINVAL)
    assert img.read_bytes() == data


async def test_punch_hole_unmaps_with_discard(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(
        exportd, workdir, writable=True, node_opts={"discard": "unmap"}
    )
    blocks = img.stat().st_blocks
    r = await arun(["fallocate", "-p", "-o", "0", "-l", str(SIZE // 2), str(mnt)])
    assert r.returncode == 0, r.stderr
    assert img.read_bytes() == bytes(SIZE // 2) + data[SIZE // 2 :]
    assert img.stat().st_blocks < blocks


async def test_seek_data_hole(exportd: Exportd, workdir: Path) -> None:
    size = 4 << 20
    img = workdir / "sparse.raw"
    mnt = workdir / "mnt.raw"
    mnt.touch()
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(65536))
        f.seek(3 << 20)
        f.write(os.urandom(4096))
    await exportd.blockdev_file("file0", img)
    await exportd.add_export("exp0", "file0", mnt)

    def seek_all(path: Path) -> list[object]:
        fd = os.open(path, os.O_RDONLY)
        out: list[object] = []
        try:
            for off in (0, 4096, 1 << 20, (1 << 20) + 65535, (1 << 20) + 65536, 2 << 20,
                        3 << 20, size - 1, size, size + 1):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        out.append(os.lseek(fd, off, whence))
                    except OSError as e:
                        out.append(errno.errorcode[e.errno])
        finally:
            os.close(fd)
        return out

    via_export = await athread(seek_all, mnt)
    direct = seek_all(img)
    # SEEK_HOLE exactly at EOF: local file systems say ENXIO, QEMU's FUSE
    # export (and so exportd) answers EOF itself; everything else must match
    assert via_export[17] == size and direct[17] == "ENXIO"
    assert via_export[:17] + via_export[18:] == direct[:17] + direct[18:]
    assert via_export[16] == "ENXIO"  # SEEK_DATA at EOF
    assert via_export[18] == "ENXIO" and via_export[19] == "ENXIO"  # past EOF
    assert via_export[4] == 1 << 20  # SEEK_DATA inside data
    assert via_export[1] == 0 and via_export[0] == 1 << 20  # hole at 0, data at 1 MiB


async def test_fsync_and_writethrough(exportd: Exportd, workdir: Path) -> None:
    img, mnt, _ = await export_image(exportd, workdir, writable=True, writethrough=True)

    def write_sync() -> None:
        fd = os.open(mnt, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"durable", 0) == 7
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    await athread(write_sync)
    assert img.read_bytes()[:7] == b"durable"


async def test_shared_mmap_writes_land_in_image(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True)

    def mmap_write() -> bytes:
        fd = os.open(mnt, os.O_RDWR)
        try:
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                seen = m[8192:8200]
                m[4096:4096 + 11] = b"from mmap!!"
                m.flush()
                return seen
        finally:
            os.close(fd)

    seen = await athread(mmap_write)
    assert seen == data[8192:8200]
    assert img.read_bytes()[4096 : 4096 + 11] == b"from mmap!!"


async def test_two_exports_of_one_node(exportd: Exportd, workdir: Path) -> None:
    img, mnt, data = await export_image(exportd, workdir, writable=True)
    ro = workdir / "ro.raw"
    ro.touch()
    await exportd.add_export("exp-ro", "file0", ro)
    r = await arun(["dd", "if=/dev/zero", f"of={mnt}", "bs=4096", "count=2", "seek=3", "conv=notrunc"])
    assert r.returncode == 0, r.stderr
    got = await athread(ro.read_bytes)
    assert got == data[: 3 * 4096] + bytes(8192) + data[5 * 4096 :]
    exports = await exportd.exports()
    assert [(e["id"], e["writable"]) for e in exports] == [("exp-ro", False), ("exp0", True)]


async def test_cp_and_qemu_img_compare(exportd: Exportd, workdir: Path) -> None:
    img, mnt, _ = await export_image(exportd, workdir, SIZE + 777)
    copy = workdir / "copy.raw"
    r = await arun(["cp", str(mnt), str(copy)])
    assert r.returncode == 0, r.stderr
    assert copy.read_bytes() == img.read_bytes()
    r = await arun(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(mnt), str(img)])
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr


async def test_size_current_across_exports_of_one_node(exportd: Exportd, workdir: Path) -> None:
    img, mnt, _ = await export_image(exportd, workdir, writable=True)
    ro = workdir / "ro.raw"
    ro.touch()
    await exportd.add_export("exp-ro", "file0", ro)
    assert (await athread(os.stat, ro)).st_size == SIZE
    r = await arun(["truncate", "-s", str(SIZE * 3), str(mnt)])
    assert r.returncode == 0, r.stderr
    # no waiting for an attribute cache to expire
    assert (await athread(os.stat, ro)).st_size == SIZE * 3

    def seek_end() -> int:
        fd = os.open(ro, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    assert await athread(seek_end) == SIZE * 3
