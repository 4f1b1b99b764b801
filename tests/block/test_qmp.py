"""blockdev-add, blockdev-del and query-named-block-nodes through a real
exportd process (fixtures `daemon` and `qmp` from tests/conftest.py), with
QEMU's error texts (checked against qemu-storage-daemon 7.2 by hand)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from tests.support.images import make_pattern_image as make_image

MiB = 1 << 20


async def error_of(client: Any, cmd: str, args: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as e:
        await client.execute(cmd, args)
    return e.value.error.error.class_, e.value.error.error.desc


async def names(client: Any) -> list[str]:
    return [n["node-name"] for n in await client.execute("query-named-block-nodes")]


async def test_add_query_del(daemon: Any, qmp: Any, tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    make_image(img, MiB)
    d = daemon("--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=on")
    c = await qmp(d)
    await c.execute("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0",
                                     "offset": 4096, "size": 8192})
    await c.execute("blockdev-add", {"driver": "raw", "node-name": "r2", "read-only": True,
                                     "file": {"driver": "file", "filename": str(img)}})
    await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 65536})
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    by_name = {n["node-name"]: n for n in nodes}
    auto = [n for n in by_name if n.startswith("#block")]
    assert len(auto) == 1
    assert [n["node-name"] for n in nodes] == ["n", "r2", auto[0], "r", "f0"]  # newest first
    f0 = by_name["f0"]
    assert f0["drv"] == "file" and f0["ro"] is False and f0["file"] == str(img)
    assert f0["encrypted"] is False and f0["backing_file_depth"] == 0
    assert f0["cache"] == {"writeback": True, "direct": True, "no-flush": False}
    assert f0["image"]["filename"] == str(img) and f0["image"]["format"] == "file"
    assert f0["image"]["virtual-size"] == MiB
    assert f0["image"]["actual-size"] >= MiB - 4096
    r = by_name["r"]
    assert r["drv"] == "raw" and r["image"]["virtual-size"] == 8192
    assert r["file"].startswith("json:") and r["image"]["format"] == "raw"
    r2 = by_name["r2"]
    assert r2["ro"] is True and r2["file"] == str(img) and by_name[auto[0]]["ro"] is True
    n = by_name["n"]
    assert n["drv"] == "null-co" and n["file"] == "null-co://" and n["image"]["virtual-size"] == 65536
    assert await c.execute("query-named-block-nodes") == nodes  # flat only matters for chains

    # deletion rules, with QEMU's texts
    assert await error_of(c, "blockdev-del", {"node-name": "f0"}) == ("GenericError", "Block device f0 is in use")
    assert await error_of(c, "blockdev-del", {"node-name": auto[0]}) == (
        "GenericError", f"Node {auto[0]} is not owned by the monitor")
    assert await error_of(c, "blockdev-del", {"node-name": "zz"}) == (
        "GenericError", "Failed to find node with node-name='zz'")
    await c.execute("blockdev-del", {"node-name": "r2"})  # its nested file goes with it
    await c.execute("blockdev-del", {"node-name": "r"})
    await c.execute("blockdev-del", {"node-name": "f0"})
    assert await names(c) == ["n"]
    # the name is free again
    await c.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)})
    assert await names(c) == ["f0", "n"]


async def test_errors_verbatim(daemon: Any, qmp: Any, tmp_path: Path) -> None:
    img = tmp_path / "b.img"
    make_image(img, MiB)
    d = daemon()
    c = await qmp(d)
    await c.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    missing = tmp_path / "missing.img"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"driver": "file", "node-name": "f", "filename": str(img)}, "Duplicate nodes with node-name='f'"),
        ({"driver": "file", "node-name": "g", "filename": str(missing)},
         f"Could not open '{missing}': No such file or directory"),
        ({"driver": "file", "node-name": "g", "filename": str(tmp_path)},
         f"Could not open '{tmp_path}': Is a directory"),
        ({"driver": "raw", "node-name": "g", "file": "zz"}, "Cannot find device='zz' nor node-name='zz'"),
        ({"driver": "raw", "file": "f"}, "'node-name' must be specified for the root node"),
        ({"driver": "raw", "node-name": "#x", "file": "f"}, "Invalid node-name: '#x'"),
        ({"driver": "raw", "node-name": "g", "file": "f", "offset": 1 << 30},
         "Offset (1073741824) cannot be greater than size of the containing file (1048576)"),
        ({"driver": "raw", "node-name": "g", "file": "f", "size": 1000}, "Specified size is not multiple of 512"),
        ({"driver": "file", "node-name": "g", "filename": str(img), "force-share": True},
         "force-share=on can only be used with read-only images"),
        # argument errors come from the schema layer
        ({"driver": "file", "node-name": "g"}, "Parameter 'filename' is missing"),
        ({"driver": "file", "node-name": "g", "filename": 3}, "Invalid parameter type for 'filename', expected: string"),
        ({"driver": "file", "node-name": "g", "filename": str(img), "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"node-name": "g"}, "Parameter 'driver' is missing"),
        ({"driver": "nbdx", "node-name": "g"}, "Parameter 'driver' does not accept value 'nbdx'"),
        ({"driver": "raw", "node-name": "g", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
        ({"driver": "raw", "node-name": "g", "file": "f", "offset": -1},
         "Parameter 'offset' expects a non-negative number below 2^64"),
        ({"driver": "file", "node-name": "g", "filename": str(img), "cache": {"direct": "yes"}},
         "Invalid parameter type for 'cache.direct', expected: boolean"),
        ({"driver": "file", "node-name": "g", "filename": str(img), "discard": "maybe"},
         "Parameter 'discard' does not accept value 'maybe'"),
    ]
    for args, text in cases:
        assert await error_of(c, "blockdev-add", args) == ("GenericError", text), args
    assert await error_of(c, "blockdev-del", {}) == ("GenericError", "Parameter 'node-name' is missing")
    assert await error_of(c, "query-named-block-nodes", {"flat": "x"}) == (
        "GenericError", "Invalid parameter type for 'flat', expected: boolean")
    # nothing half-made was left behind, and the daemon still serves
    assert await names(c) == ["f"]
    assert (await c.execute("query-named-block-nodes"))[0]["image"]["virtual-size"] == MiB


async def test_export_holds_its_node(daemon: Any, qmp: Any, tmp_path: Path) -> None:
    img = tmp_path / "e.img"
    make_image(img, MiB)
    mnt = tmp_path / "mnt.raw"
    mnt.touch()
    d = daemon("--blockdev", f"driver=file,node-name=f,filename={img}",
               "--blockdev", "driver=raw,node-name=r,file=f")
    c = await qmp(d)
    assert await error_of(c, "block-export-add", {"type": "fuse", "id": "e", "node-name": "nope",
                                                 "mountpoint": str(mnt)}) == (
        "GenericError", "Cannot find device='' nor node-name='nope'")
    await c.execute("block-export-add", {"type": "fuse", "id": "e", "node-name": "r",
                                         "mountpoint": str(mnt), "writable": True})
    try:
        assert await error_of(c, "blockdev-del", {"node-name": "r"}) == ("GenericError", "Node r is in use")
        assert await error_of(c, "blockdev-del", {"node-name": "f"}) == ("GenericError", "Block device f is in use")
        await c.execute("block-export-del", {"id": "e"})
        for _ in range(200):
            if not await c.execute("query-block-exports"):
                break
            await asyncio.sleep(0.05)
        await c.execute("blockdev-del", {"node-name": "r"})
        await c.execute("blockdev-del", {"node-name": "f"})
        assert await names(c) == []
    finally:
        if str(mnt) in Path("/proc/self/mounts").read_text():
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
async def test_two_daemons_one_qcow2_image(daemon: Any, qmp: Any, tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    rw = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    ro = {**rw, "read-only": True}
    a, b = daemon(), daemon()
    ca, cb = await qmp(a), await qmp(b)
    await ca.execute("blockdev-add", rw)
    assert await error_of(cb, "blockdev-add", rw) == (
        "GenericError", f'Failed to get "write" lock\nIs another process using the image [{img}]?')
    # a reader that does not share writes is refused too, unless it forces sharing
    assert (await error_of(cb, "blockdev-add", ro))[1].startswith('Failed to get shared "write" lock')
    await cb.execute("blockdev-add", {**ro, "force-share": True})
    listed = await names(cb)
    assert listed[0] == "q" and listed[1].startswith("#block") and len(listed) == 2
    await cb.execute("blockdev-del", {"node-name": "q"})
    # once the writer is gone, two readers share the image
    await ca.execute("blockdev-del", {"node-name": "q"})
    await ca.execute("blockdev-add", ro)
    await cb.execute("blockdev-add", ro)
    # ... and refuse a new writer, even in one of the two daemons
    assert (await error_of(ca, "blockdev-add", {**rw, "node-name": "w"}))[1].startswith(
        'Failed to get "write" lock')
    # and a second raw writer of one file is allowed: raw shares writes, as in QEMU
    raw = tmp_path / "r.img"
    make_image(raw, 65536)
    rawopts = {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(raw)}}
    await ca.execute("blockdev-add", rawopts)
    await cb.execute("blockdev-add", rawopts)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
async def test_query_backing_chain(daemon: Any, qmp: Any, tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top)], check=True)
    d = daemon()
    c = await qmp(d)
    await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                     "file": {"driver": "file", "filename": str(top)}})
    nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
    t = nodes["top"]
    assert t["drv"] == "qcow2" and t["backing_file_depth"] == 2
    assert t["backing_file"] == str(mid)
    assert t["image"]["backing-image"]["filename"] == str(mid)
    assert t["image"]["backing-image"]["backing-image"]["filename"] == str(base)
    flat = {n["node-name"]: n for n in await c.execute("query-named-block-nodes", {"flat": True})}
    assert "backing-image" not in flat["top"]["image"] and flat["top"]["backing_file_depth"] == 2
    assert len(nodes) == 6  # top, mid, base and their three file nodes
