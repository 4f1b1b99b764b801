"""read_now, the synchronous READ contract: bytes, extents, or None (await read()).

Every byte is checked from another process, against a plain file holding
what the mount should show.
"""

from __future__ import annotations

import os

import pytest

from exportd.extents import ZEROES, Extent
from exportd.fuse.filesystem import FOPEN_DIRECT_IO, Attr, OpenReply, SingleFileFS
from tests.support.fuse import child, pattern, serving
from tests.support.toyfs import MemoryFS

MiB = 1 << 20
K = 1024

COMPARE_CODE = """
mounted, reference = sys.argv[1], sys.argv[2]
offsets = [int(x) for x in sys.argv[3].split(",")]
sizes = [int(x) for x in sys.argv[4].split(",")]
a = os.open(mounted, os.O_RDONLY); b = os.open(reference, os.O_RDONLY)
bad = []
for off in offsets:
    for n in sizes:
        got, want = os.pread(a, n, off), os.pread(b, n, off)
        if got != want:
            bad.append([off, n, len(got), len(want)])
whole = open(mounted, "rb").read() == open(reference, "rb").read()
out([bad, whole])
"""


async def compare(mounted: str, reference: str, offsets: list[int], sizes: list[int]) -> None:
    bad, whole = await child(
        COMPARE_CODE, mounted, reference, ",".join(map(str, offsets)), ",".join(map(str, sizes))
    )
    assert bad == []
    assert whole


class BytesNowFS(MemoryFS):
    """read_now answers every read with a view of the data; read() never runs."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.reads = 0

    def read_now(self, fh, offset, size):
        return memoryview(self.data)[offset : offset + size]

    async def read(self, fh, offset, size):
        self.reads += 1
        return await super().read(fh, offset, size)


class NoneNowFS(MemoryFS):
    """read_now always says "await read()"."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.asked = self.reads = 0

    def read_now(self, fh, offset, size):
        self.asked += 1
        return None

    async def read(self, fh, offset, size):
        self.reads += 1
        return await super().read(fh, offset, size)


SIZE = 3 * 65536 + 1234
OFFSETS = [0, 1, 511, 4095, 4096, 65535, 65536, 131071, SIZE - 4097, SIZE - 1]
SIZES = [1, 512, 4096, 4097, 65536, 65537, 200000]


@pytest.mark.parametrize("fs_class", [BytesNowFS, NoneNowFS], ids=["bytes", "none"])
async def test_read_now_bytes_or_none(target, workdir, fs_class):
    fs = fs_class(SIZE, direct_io=True)
    fs.data[:] = pattern(SIZE)
    reference = workdir / "reference.img"
    reference.write_bytes(pattern(SIZE))
    async with serving(fs, target) as session:
        await compare(target, str(reference), OFFSETS, SIZES)
        reads = session.count("READ")
    assert reads >= len(OFFSETS) * len(SIZES)
    if fs_class is BytesNowFS:
        assert fs.reads == 0  # every READ answered by read_now
    else:
        assert fs.asked == reads  # asked every time, and every time read() answered
        assert fs.reads == reads


class ExtentFS(SingleFileFS):
    """A file assembled from extents of other files:

        [0, 1 MiB)                 tmpfs file A from 0       (never blocks)
        [1 MiB, 1.5 MiB)           zeroes
        [1.5 MiB, 2.5 MiB)         disk file B from 4 KiB    (may block)
        [2.5 MiB, SIZE)            A from 2 MiB, but A ends 100 KiB later:
                                   the rest reads as zeroes

    read() gives the same bytes the slow way, for whatever read_now leaves.
    """

    splice_reads = True

    def __init__(self, a_fd: int, b_fd: int, size: int) -> None:
        self.size = size
        self.regions: list[tuple[int, int, int, int, bool]] = [  # start, end, fd, host, nb
            (0, MiB, a_fd, 0, True),
            (MiB, MiB + MiB // 2, ZEROES, 0, True),
            (MiB + MiB // 2, 2 * MiB + MiB // 2, b_fd, 4096, False),
            (2 * MiB + MiB // 2, size, a_fd, 2 * MiB, True),
        ]
        self.reads = 0

    async def getattr(self) -> Attr:
        return Attr(size=self.size, mode=0o644)

    async def open(self, flags: int) -> OpenReply:
        return OpenReply(fh=0, flags=FOPEN_DIRECT_IO)

    def read_now(self, fh: int, offset: int, size: int) -> list[Extent]:
        end = min(offset + size, self.size)
        out: list[Extent] = []
        for start, stop, fd, host, never_blocks in self.regions:
            lo, hi = max(offset, start), min(end, stop)
            if lo < hi:
                at = host + lo - start if fd >= 0 else 0
                out.append((fd, at, hi - lo, never_blocks))
        return out

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        self.reads += 1
        parts = []
        for fd, at, n, _ in self.read_now(fh, offset, size):
            data = os.pread(fd, n, at) if fd >= 0 else b""
            parts.append(data + bytes(n - len(data)))
        return b"".join(parts)



async def test_read_now_extents_of_tmpfs_disk_and_zeroes(target, workdir, shm):
    size = 3 * MiB + 1234
    a_bytes = pattern(2 * MiB + 100 * K, seed=1)
    b_bytes = pattern(4096 + MiB, seed=2)
    a_path = os.path.join(shm, "a.raw")
    b_path = workdir / "b.raw"  # not tmpfs: extents that may block
    with open(a_path, "wb") as f:
        f.write(a_bytes)
    b_path.write_bytes(b_bytes)
    want = (
        a_bytes[:MiB]
        + bytes(MiB // 2)
        + b_bytes[4096 : 4096 + MiB]
        + a_bytes[2 * MiB :]
        + bytes(size - (2 * MiB + MiB // 2) - 100 * K)
    )
    assert len(want) == size
    reference = workdir / "reference.img"
    reference.write_bytes(want)
    a_fd = os.open(a_path, os.O_RDONLY)
    b_fd = os.open(str(b_path), os.O_RDONLY)
    # B's pages out of the page cache: its first reads would block
    os.fsync(b_fd)
    os.posix_fadvise(b_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    fs = ExtentFS(a_fd, b_fd, size)
    try:
        async with serving(fs, target) as session:
            edges = [0, MiB, MiB + MiB // 2, 2 * MiB + MiB // 2, 2 * MiB + MiB // 2 + 100 * K]
            offsets = sorted({max(0, e + d) for e in edges for d in (-4097, -1, 0, 1, 65536)})
            offsets += [size - 4097, size - 1]
            await compare(target, str(reference), offsets, [1, 4096, 65537, 200000, MiB])
            spliced = session.spliced
            reads = session.count("READ")
        # Big reads inside A went through the pipe; reads of B's pages not
        # in the cache waited for read(); the rest was answered inline.
        assert spliced > 0
        assert 0 < fs.reads < reads
    finally:
        os.close(a_fd)
        os.close(b_fd)


async def test_extents_on_a_mount_without_splice(target, workdir, shm):
    """The same extents, mounted with the full max_read: read inline."""
    size = 2 * MiB
    a_bytes = pattern(size, seed=3)
    a_path = os.path.join(shm, "a.raw")
    with open(a_path, "wb") as f:
        f.write(a_bytes)
    reference = workdir / "reference.img"
    reference.write_bytes(a_bytes)
    a_fd = os.open(a_path, os.O_RDONLY)
    fs = ExtentFS(a_fd, a_fd, size)
    fs.splice_reads = False
    fs.regions = [(0, size, a_fd, 0, True)]
    try:
        async with serving(fs, target) as session:
            await compare(target, str(reference), [0, 1, 4096, MiB - 1, size - 1], [1, 65536, MiB])
            assert session.spliced == 0
        assert fs.reads == 0
    finally:
        os.close(a_fd)
