"""An export keeps serving while the graph replaces its node (what a
snapshot, commit or mirror pivot does), with no QMP in between: a file
descriptor opened on the export before the move keeps working, and its
reads and writes reach the new node."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exportd.errors import BlockError
from tests.support.host import Host, add
from tests.support.images import make_image
from tests.support.threads import athread

SIZE = 1 << 20


async def test_open_file_follows_its_export_to_the_new_node(host: Host, workdir: Path) -> None:
    a = make_image(workdir / "a.img", SIZE, seed=1)
    b = make_image(workdir / "b.img", SIZE, seed=2)
    g = host.graph
    await g.add({"driver": "raw", "node-name": "ra", "file": {"driver": "file", "filename": str(workdir / "a.img")}})
    rb = await g.add({"driver": "raw", "node-name": "rb",
                      "file": {"driver": "file", "filename": str(workdir / "b.img")}})
    exp = await add(host, workdir, "e", "ra", writable=True)
    mnt = workdir / "e.raw"
    fd = await athread(os.open, str(mnt), os.O_RDWR)
    try:
        assert await athread(os.pread, fd, 4096, 8192) == a[8192 : 8192 + 4096]

        g.replace_node(g.get("ra"), rb)  # on the loop, as a job's pivot is

        assert exp.node is rb and exp.info()["node-name"] == "rb"
        assert g.get("ra").users == []
        assert await athread(os.pread, fd, 4096, 8192) == b[8192 : 8192 + 4096]
        assert await athread(os.pwrite, fd, b"N" * 4096, 0) == 4096
        await athread(os.fsync, fd)
    finally:
        await athread(os.close, fd)
    assert (workdir / "b.img").read_bytes()[:4096] == b"N" * 4096  # the write landed on the new node
    assert (workdir / "a.img").read_bytes() == a  # and nothing on the old one
    await g.delete("ra")  # free now: nobody holds it


async def test_a_refused_move_leaves_the_export_serving_the_old_node(host: Host, workdir: Path) -> None:
    a = make_image(workdir / "a.img", SIZE, seed=3)
    make_image(workdir / "b.img", SIZE, seed=4)
    g = host.graph
    await g.add({"driver": "raw", "node-name": "ra", "file": {"driver": "file", "filename": str(workdir / "a.img")}})
    rb = await g.add({"driver": "raw", "node-name": "rb", "read-only": True,
                      "file": {"driver": "file", "filename": str(workdir / "b.img")}})
    exp = await add(host, workdir, "e", "ra", writable=True)
    with pytest.raises(BlockError, match="read-only"):
        g.replace_node(g.get("ra"), rb)  # a writable export cannot move onto a read-only node
    assert exp.node is g.get("ra") and rb.users == []
    data = await athread(lambda: (workdir / "e.raw").read_bytes())
    assert data == a


async def test_a_passthrough_export_moves_only_with_no_passthrough_file_open(host: Host, workdir: Path) -> None:
    # the kernel serves a file opened by passthrough from the old image file
    # itself: while one is open the export refuses to move; once all are
    # closed it moves, and later opens are served by the daemon
    a = make_image(workdir / "a.img", SIZE, seed=5)
    b = make_image(workdir / "b.img", SIZE, seed=6)
    g = host.graph
    await g.add({"driver": "raw", "node-name": "ra", "file": {"driver": "file", "filename": str(workdir / "a.img")}})
    rb = await g.add({"driver": "raw", "node-name": "rb",
                      "file": {"driver": "file", "filename": str(workdir / "b.img")}})
    exp = await add(host, workdir, "e", "ra")
    if not exp.passthrough:
        pytest.skip(f"no FUSE passthrough here: {exp.passthrough_reason}")
    mnt = str(workdir / "e.raw")
    fd = await athread(os.open, mnt, os.O_RDONLY)
    try:
        with pytest.raises(BlockError, match="1 file\\(s\\) open through FUSE passthrough"):
            g.replace_node(g.get("ra"), rb)
        assert exp.node is g.get("ra") and rb.users == []
        assert await athread(os.pread, fd, SIZE, 0) == a
    finally:
        await athread(os.close, fd)
    for _ in range(100):  # the kernel sends RELEASE after close() has returned
        if exp.passthrough_open == 0:
            break
        await asyncio.sleep(0.01)
    g.replace_node(g.get("ra"), rb)
    assert exp.node is rb and not exp.passthrough
    await asyncio.gather(*exp._invalidations)
    assert await athread(lambda: (workdir / "e.raw").read_bytes()) == b


async def test_the_kernel_sees_the_new_nodes_size_at_once(host: Host, workdir: Path) -> None:
    # the export is its node's only writer, so the kernel caches the size
    # for a second (as with QEMU); a replacement must drop that cache
    make_image(workdir / "a.img", SIZE, seed=7)
    make_image(workdir / "b.img", 2 * SIZE, seed=8)
    g = host.graph
    await g.add({"driver": "raw", "node-name": "ra", "file": {"driver": "file", "filename": str(workdir / "a.img")}})
    rb = await g.add({"driver": "raw", "node-name": "rb",
                      "file": {"driver": "file", "filename": str(workdir / "b.img")}})
    exp = await add(host, workdir, "e", "ra", writable=True)
    mnt = str(workdir / "e.raw")
    assert (await athread(os.stat, mnt)).st_size == SIZE  # now cached for up to 1 s
    g.replace_node(g.get("ra"), rb)
    await asyncio.gather(*exp._invalidations)
    assert (await athread(os.stat, mnt)).st_size == 2 * SIZE
