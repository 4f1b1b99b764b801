"""READ replies spliced from tmpfs images (fuse/splice.py): same bytes as
the image, holes and the end of the file handled, on raw and qcow2, and
only where the pages cannot block (a tmpfs image, not a disk one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exportd.fuse.splice import SPLICE_MAX_READ
from tests.support.host import Host, add
from tests.support.images import make_image
from tests.support.programs import arun

MIB = 1 << 20
SIZE = 6 * MIB + 12345  # the last read runs past the end

READER = """
import json, os, sys
path, image = sys.argv[1], sys.argv[2]
want = open(image, "rb").read()
fd = os.open(path, os.O_RDONLY)
bad = []
for off, n in [(0, 1 << 20), (4096, 1 << 20), (12345, 3 * (1 << 20)), (len(want) - 100000, 1 << 20),
               (2 << 20, 200000), (len(want), 4096)]:
    got = os.pread(fd, n, off)
    if got != want[off:off + n]:
        bad.append([off, n, len(got)])
os.close(fd)
print(json.dumps(bad))
"""



async def read_back(mountpoint: Path, image_as_raw: Path) -> list:
    r = await arun([sys.executable, "-c", READER, str(mountpoint), str(image_as_raw)])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_spliced(session, at_least: int) -> None:
    """At least that many READ replies spliced; none under FUSE over
    io_uring, whose replies are copied into the ring entry (the same bytes,
    checked by read_back, came through the ring)."""
    if session.io_uring:
        assert session.spliced == 0 and session.ring_served > 0
    else:
        assert session.spliced >= at_least


def max_read_of(mountpoint: Path) -> int:
    for line in open("/proc/self/mounts"):
        fields = line.split()
        if fields[1] == str(mountpoint):
            opts = dict(o.partition("=")[::2] for o in fields[3].split(","))
            return int(opts["max_read"])
    raise AssertionError(f"{mountpoint} not mounted")


async def test_raw_reads_are_spliced_from_a_tmpfs_image(host: Host, workdir: Path, shm: Path) -> None:
    make_image(shm / "img.raw", SIZE)
    await host.graph.add({"driver": "file", "node-name": "f", "filename": str(shm / "img.raw")})
    exp = await add(host, workdir, "e", node="f", passthrough="off")
    assert max_read_of(workdir / "e.raw") == SPLICE_MAX_READ
    assert await read_back(workdir / "e.raw", shm / "img.raw") == []
    assert_spliced(exp.session, 3)


async def test_a_disk_image_is_not_spliced(host: Host, workdir: Path) -> None:
    make_image(workdir / "img.raw", SIZE)  # /tmp: pages may have to come from a disk
    await host.graph.add({"driver": "file", "node-name": "f", "filename": str(workdir / "img.raw")})
    exp = await add(host, workdir, "e", node="f", passthrough="off")
    assert max_read_of(workdir / "e.raw") == MIB
    assert await read_back(workdir / "e.raw", workdir / "img.raw") == []
    assert exp.session.spliced == 0


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (test oracle) missing")
async def test_qcow2_reads_are_spliced_where_clusters_hold_data(
    host: Host, workdir: Path, shm: Path
) -> None:
    # data, then a zeroed range and an unallocated one: those reads fall back
    # qcow2 sizes are whole sectors: a tail of 12288 still ends mid-cluster
    data = bytearray(make_image(shm / "src.raw", 6 * MIB + 12288))
    data[2 * MIB : 3 * MIB] = bytes(MIB)
    data[4 * MIB + 65536 : 5 * MIB] = bytes(MIB - 65536)
    (shm / "src.raw").write_bytes(data)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "4096",
         str(shm / "src.raw"), str(shm / "img.qcow2")],
        check=True, capture_output=True,
    )
    await host.graph.add({"driver": "file", "node-name": "f", "filename": str(shm / "img.qcow2")})
    await host.graph.add({"driver": "qcow2", "node-name": "q", "file": "f"})
    exp = await add(host, workdir, "e", node="q")
    assert max_read_of(workdir / "e.raw") == SPLICE_MAX_READ
    assert await read_back(workdir / "e.raw", shm / "src.raw") == []
    assert await read_back(workdir / "e.raw", shm / "src.raw") == []  # L2 tables cached now
    assert_spliced(exp.session, 1)
