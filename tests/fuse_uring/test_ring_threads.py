"""Ring threads (EXPORTD_FUSE_URING_THREADS=1): READ and WRITE of a host
file answered off the loop (fuse/ringthread.py, export/hostio.py).

Every test drives a real daemon through real mounts, from other processes
(O_DIRECT, so each request reaches the daemon), and checks the image file
itself or what QMP reports, and the daemon's own count of requests its
ring threads answered (logged when the ring closes)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.fuse import pattern
from tests.support.threads import athread

BLOCK = 4096
# A child process that does O_DIRECT I/O on a mount: "w OFF SEED" writes a
# block of pattern(SEED) at OFF, "r OFF" prints the sha of a block.
CHILD = r"""
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
for op in sys.argv[2:]:
    kind, off, *rest = op.split(":")
    off = int(off)
    if kind == "w":
        seed = int(rest[0])
        buf[:] = bytes((i * 7 + seed) & 0xFF for i in range(4096))
        assert os.pwritev(fd, [buf], off) == 4096
    else:
        assert os.preadv(fd, [buf], off) == 4096
        print(hashlib.sha256(buf).hexdigest())
os.close(fd)
"""


def block(seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(BLOCK))


def direct_io(mount: Path, *ops: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(mount), *ops],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def answered(log: str) -> tuple[int, int]:
    """READ and WRITE the ring threads answered, summed over closed rings."""
    found = re.findall(r"ring threads answered (\d+) READ and (\d+) WRITE", log)
    return sum(int(r) for r, _ in found), sum(int(w) for _, w in found)


@pytest.fixture
def threads_on(monkeypatch, need_ring):
    monkeypatch.setenv("EXPORTD_FUSE_URING_THREADS", "1")


def image_and_mount(workdir: Path, content: bytes) -> tuple[Path, Path]:
    """An image file with `content`, and an empty file to mount an export on."""
    img = workdir / "d.img"
    img.write_bytes(content)
    mnt = workdir / "m.raw"
    mnt.touch()
    return img, mnt


async def start(workdir: Path) -> Exportd:
    d = Exportd(workdir)
    await d.start("--log-level", "info")
    return d


@pytest.mark.parametrize("design", ["per-queue", "one-spinning"])
async def test_reads_and_writes_of_a_raw_file_are_answered_by_the_threads(workdir, threads_on, monkeypatch,
                                                                          design):
    if design == "one-spinning":  # one thread for every queue, looking for work between requests
        monkeypatch.setenv("EXPORTD_FUSE_URING_THREADS", "one")
        monkeypatch.setenv("EXPORTD_FUSE_URING_SPIN_US", "50")
    img, mnt = image_and_mount(workdir, pattern(1 << 20))
    d = await start(workdir)
    try:
        # raw with a window over the file: the threads add its offset
        await d.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        await d.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f",
                                     "offset": 65536, "size": 512 * 1024})
        await d.add_export("e", "r", mnt, writable=True, io_uring="on")
        ops = [f"w:{i * 3 * BLOCK}:{i}" for i in range(40)] + [f"r:{i * 3 * BLOCK}" for i in range(40)]
        sums = await athread(direct_io, mnt, *ops)
        expect = pattern(1 << 20)
        assert sums == [hashlib.sha256(block(i)).hexdigest() for i in range(40)]
        data = img.read_bytes()
        for i in range(40):
            at = 65536 + i * 3 * BLOCK
            assert data[at : at + BLOCK] == block(i), i
        # nothing outside the window moved
        assert data[:65536] == expect[:65536]
        assert data[65536 + 512 * 1024 :] == expect[65536 + 512 * 1024 :]
        # the last block of the window, and a read past its end
        assert (await athread(direct_io, mnt, f"w:{512 * 1024 - BLOCK}:99", f"r:{512 * 1024 - BLOCK}"))
        await d.del_export("e")
        await d.quit()
    finally:
        await d.stop()
    reads, writes = answered(d.log.read_text())
    assert reads >= 40 and writes >= 40, (reads, writes)


async def test_a_bitmap_added_while_writing_counts_every_later_write(workdir, threads_on):
    """Without the quiesce before each command, the threads would go on
    writing past the new bitmap (the export's node did not change)."""
    img, mnt = image_and_mount(workdir, bytes(1 << 20))
    d = await start(workdir)
    try:
        await d.blockdev_file("f", img)
        await d.add_export("e", "f", mnt, writable=True, io_uring="on")
        await athread(direct_io, mnt, *[f"w:{i * BLOCK}:{i}" for i in range(8)])  # threads write
        await d.cmd("block-dirty-bitmap-add", {"node": "f", "name": "b", "granularity": 65536})
        await athread(direct_io, mnt, f"w:{5 * 65536}:1", f"w:{9 * 65536}:2")
        nodes = await d.cmd("query-named-block-nodes")
        (bitmap,) = [b for n in nodes if n["node-name"] == "f" for b in n.get("dirty-bitmaps", [])]
        assert bitmap["count"] == 2 * 65536, bitmap
        await d.cmd("block-dirty-bitmap-remove", {"node": "f", "name": "b"})
        # and with the bitmap gone, the threads write again
        await athread(direct_io, mnt, *[f"w:{i * BLOCK}:{i + 50}" for i in range(8)])
        await d.del_export("e")
        await d.quit()
    finally:
        await d.stop()
    data = img.read_bytes()
    assert data[5 * 65536 : 5 * 65536 + BLOCK] == block(1)
    assert data[:BLOCK] == block(50)
    reads, writes = answered(d.log.read_text())
    assert writes >= 15, writes  # the 8 before the bitmap and most of the 8 after it


@pytest.mark.parametrize("io_uring", ["on", "off"])
async def test_an_export_over_our_own_mount_stays_on_the_loop(workdir, monkeypatch, io_uring):
    """A file on FUSE (here our own export) gets no thread view: dropping
    one closes a descriptor of that file, whose FLUSH the loop would have to
    answer while it closes it. Commands keep being answered, and deleting
    the node closes its descriptor off the loop (with io-uring off too: that
    close hung the daemon before)."""
    if io_uring == "on":
        from exportd.fuse import uring

        if uring.unavailable_reason():
            pytest.skip(uring.unavailable_reason())
        monkeypatch.setenv("EXPORTD_FUSE_URING_THREADS", "1")
    img = workdir / "d.img"
    img.write_bytes(pattern(1 << 20))
    inner = workdir / "inner.raw"
    outer = workdir / "outer.raw"
    inner.touch()
    outer.touch()
    d = await start(workdir)
    try:
        await d.blockdev_file("f", img)
        await d.add_export("in", "f", inner, writable=True, io_uring=io_uring)
        await d.blockdev_file("g", inner)
        await d.add_export("out", "g", outer, writable=True, io_uring=io_uring)
        await athread(direct_io, outer, "w:0:7", "r:0")
        for _ in range(3):  # each command would drop (and close) a view
            await d.cmd("block-set-write-threshold", {"node-name": "g", "write-threshold": 0})
            await athread(direct_io, outer, "w:8192:8")
        await d.del_export("out")
        await d.cmd("blockdev-del", {"node-name": "g"})
        await d.del_export("in")
        await d.quit()
    finally:
        await d.stop()
    data = img.read_bytes()
    assert data[:BLOCK] == block(7) and data[8192 : 8192 + BLOCK] == block(8)


def test_the_threads_are_named_and_one_per_queue(workdir, threads_on):
    """The kernel's queues each get a thread named fuse-ring-N (as libfuse's)."""
    from exportd.fuse import uring

    img, mnt = image_and_mount(workdir, bytes(1 << 16))
    env = dict(os.environ, EXPORTD_FUSE_URING_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exportd", "--socket", str(workdir / "q.sock"),
         "--blockdev", f"driver=file,node-name=f,filename={img}",
         "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},io-uring=on"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        names: list[str] = []
        while time.monotonic() < deadline:
            names = sorted(Path(t, "comm").read_text().strip() for t in Path(f"/proc/{proc.pid}/task").iterdir())
            if any(n.startswith("fuse-ring") for n in names):
                break
            time.sleep(0.05)
        assert [n for n in names if n.startswith("fuse-ring")] == [
            f"fuse-ring-{q}" for q in range(uring.possible_cpus())]
    finally:
        proc.terminate()
        proc.wait(20)


async def test_a_qcow2_export_keeps_the_loop_driven_ring(workdir, threads_on):
    """Threads would hand every qcow2 request to the loop (one hop more than
    the loop-driven ring): such an export gets no ring threads, and works."""
    img = workdir / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    mnt = workdir / "m.raw"
    mnt.touch()
    d = await start(workdir)
    try:
        await d.blockdev_file("f", img)
        await d.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        await d.add_export("e", "q", mnt, writable=True, io_uring="on")
        assert {e["id"]: e["io-uring"] for e in await d.exports()} == {"e": True}
        names = [Path(t, "comm").read_text().strip() for t in Path(f"/proc/{d.pid}/task").iterdir()]
        assert not [n for n in names if n.startswith("fuse-ring")], names
        sums = await athread(direct_io, mnt, "w:8192:3", "r:8192")
        assert sums == [hashlib.sha256(block(3)).hexdigest()]
        await d.del_export("e")
        await d.quit()
    finally:
        await d.stop()
    assert answered(d.log.read_text()) == (0, 0)  # no thread ever served it
