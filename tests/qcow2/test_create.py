"""Images made by create_image pass `qemu-img check`; `qemu-img info` shows what was asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.mkimage import create_image
from exportd.errors import BlockError
from tests.support.qcow2 import MiB, check_clean, info, open_qcow2, read_all, run, to_raw

CASES = [
    dict(size=4 * MiB),
    dict(size=4 * MiB, cluster_size=512),
    dict(size=5 * MiB, cluster_size=2 * MiB),
    dict(size=3 * MiB + 512, cluster_size=4096, preallocation="metadata"),
    dict(size=2 * MiB, cluster_size=65536, preallocation="falloc"),
    dict(size=2 * MiB, cluster_size=16384, preallocation="full"),
    dict(size=4 * MiB, refcount_bits=1, cluster_size=4096, preallocation="metadata"),
    dict(size=4 * MiB, refcount_bits=64, cluster_size=1024),
    dict(size=4 * MiB, compat="0.10"),
    dict(size=0),
    dict(size=4 * MiB, compression_type="zstd"),
    dict(size=300 * MiB, cluster_size=512),  # several refcount blocks and L1 clusters
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
async def test_create_qcow2(tmp_path: Path, case: dict) -> None:
    img = tmp_path / "new.qcow2"
    create_image(str(img), **case)
    check_clean(img)
    i = info(img)
    assert i["format"] == "qcow2"
    assert i["virtual-size"] == case["size"]
    assert i["cluster-size"] == case.get("cluster_size", 65536)
    data = i["format-specific"]["data"]
    assert data["compat"] == case.get("compat", "1.1")
    if case.get("compat") != "0.10":
        assert data["refcount-bits"] == case.get("refcount_bits", 16)
        assert data["compression-type"] == case.get("compression_type", "zlib")
    if case.get("preallocation") in ("metadata", "falloc", "full"):
        qmap = __import__("json").loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
        assert all(e["present"] for e in qmap)
    if case["size"] and case["size"] <= 8 * MiB:
        # usable: write through our node, then qemu-img agrees
        g = BlockGraph(None)
        try:
            node = await open_qcow2(g, img)
            await node.write(12345, b"hello" * 1000)
            await node.write(case["size"] - 100, b"z" * 100)
        finally:
            await g.close_all()
        check_clean(img)
        raw = to_raw(img, tmp_path / "out.raw")
        assert raw[12345 : 12345 + 5000] == b"hello" * 1000 and raw[-100:] == b"z" * 100


async def test_create_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_image(str(base), 2 * MiB, cluster_size=4096)
    run("qemu-io", "-c", "write -P 0x61 0 2M", str(base))
    top = tmp_path / "top.qcow2"
    create_image(str(top), 2 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    check_clean(top)
    i = info(top)
    assert i["backing-filename"] == "base.qcow2"
    assert i["backing-filename-format"] == "qcow2"
    assert i["full-backing-filename"] == str(base)
    # format probed when not given
    top2 = tmp_path / "top2.qcow2"
    create_image(str(top2), 2 * MiB, backing=str(base))
    assert info(top2)["backing-filename-format"] == "qcow2"
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, top)
        assert await read_all(node) == b"a" * (2 * MiB)
        await node.write(10, b"Q")
    finally:
        await g.close_all()
    check_clean(top)


def test_create_raw(tmp_path: Path) -> None:
    for mode in ("off", "falloc", "full"):
        p = tmp_path / f"{mode}.raw"
        create_image(str(p), 3 * MiB + 7, fmt="raw", preallocation=mode)
        i = info(p)
        assert p.stat().st_size == 3 * MiB + 7
        assert i["format"] == "raw" and i["virtual-size"] == 3 * MiB + 512  # QEMU rounds up
        if mode != "off":
            assert p.stat().st_blocks * 512 >= 3 * MiB
    with pytest.raises(BlockError):
        create_image(str(tmp_path / "m.raw"), MiB, fmt="raw", preallocation="metadata")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(cluster_size=256), "Cluster size"),
    (dict(cluster_size=3000), "Cluster size"),
    (dict(cluster_size=4 * MiB), "Cluster size"),
    (dict(size=1000), "multiple of 512"),
    (dict(refcount_bits=3), "Refcount width"),
    (dict(compat="0.10", refcount_bits=8), "refcount widths"),
    (dict(fmt="vmdk"), "Format"),
    (dict(backing="does-not-exist.qcow2"), "Could not open backing file"),
    (dict(preallocation="sparse"), "preallocation"),
])
def test_create_refuses(tmp_path: Path, kwargs: dict, msg: str) -> None:
    args = dict(size=MiB)
    args.update(kwargs)
    with pytest.raises(BlockError, match=msg):
        create_image(str(tmp_path / "x.img"), **args)


@pytest.mark.parametrize("prealloc", ["off", "metadata", "full"])
async def test_create_on_node(tmp_path: Path, prealloc: str) -> None:
    """The blockdev-create path: format an opened file node."""
    from exportd.block.qcow2.create import create_qcow2_on_node

    base = tmp_path / "b.qcow2"
    create_image(str(base), MiB)
    img = tmp_path / "n.qcow2"
    img.write_bytes(b"junk" * 100000)  # formatting replaces old contents
    g = BlockGraph(None)
    try:
        f = await g.add({"driver": "file", "node-name": "f", "filename": str(img)})
        if prealloc == "off":
            await create_qcow2_on_node(f, 3 * MiB, cluster_size=4096, backing_file="b.qcow2",
                                       refcount_bits=8)
        else:
            await create_qcow2_on_node(f, 3 * MiB, cluster_size=4096, version="v2",
                                       preallocation=prealloc)
    finally:
        await g.close_all()
    check_clean(img)
    i = info(img)
    assert i["virtual-size"] == 3 * MiB and i["cluster-size"] == 4096
    if prealloc == "off":
        assert i["backing-filename"] == "b.qcow2" and i["backing-filename-format"] == "qcow2"
        assert i["format-specific"]["data"]["refcount-bits"] == 8
    else:
        assert i["format-specific"]["data"]["compat"] == "0.10"
    assert to_raw(img, tmp_path / "n.raw") == bytes(3 * MiB)


async def test_create_refuses_an_image_in_use(tmp_path: Path) -> None:
    img = tmp_path / "busy.qcow2"
    create_image(str(img), MiB)
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        await node.write(0, b"keep")
        with pytest.raises(BlockError, match="lock"):
            create_image(str(img), 2 * MiB)
    finally:
        await g.close_all()
    check_clean(img)
    assert info(img)["virtual-size"] == MiB
    assert to_raw(img, tmp_path / "busy.raw")[:4] == b"keep"
