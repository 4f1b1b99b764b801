"""Open-time behaviour: refusals naming the feature, corrupt images read-only,
backing options, truncate, introspection."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.errors import BlockError
from tests.support.qcow2 import MiB, check_clean, info, open_qcow2, read_all, run, to_raw


def _set_u64(path: Path, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def _get_u64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


@pytest.mark.parametrize("method,name", [(1, "AES"), (2, "LUKS")])
async def test_refuses_encryption(graph, tmp_path: Path, method: int, name: str) -> None:
    # crypt_method set in a plain image (qemu-img's LUKS creation benchmarks the
    # CPU and fails on a busy machine); the driver refuses on the field alone
    img = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    with open(img, "r+b") as f:
        f.seek(32)
        f.write(struct.pack(">I", method))
    with pytest.raises(BlockError, match=f"encryption \\({name}\\)"):
        await open_qcow2(graph, img)
    assert "q" not in graph and not graph.nodes()  # the file child was released too


async def test_refuses_external_data_file(graph, tmp_path: Path) -> None:
    img = tmp_path / "df.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.raw'}",
        str(img), "1M")
    with pytest.raises(BlockError, match="external data file"):
        await open_qcow2(graph, img)


async def test_refuses_extended_l2(graph, tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(img), "1M")
    with pytest.raises(BlockError, match="extended L2"):
        await open_qcow2(graph, img)


async def test_refuses_unknown_incompatible_bit(graph, tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    _set_u64(img, 72, 1 << 40)
    with pytest.raises(BlockError, match="Unknown incompatible feature: 10000000000"):
        await open_qcow2(graph, img)


async def test_corrupt_image_only_read_only(graph, tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-io", "-c", "write -P 7 0 64k", str(img))
    _set_u64(img, 72, _get_u64(img, 72) | 2)
    with pytest.raises(BlockError, match="corrupt"):
        await open_qcow2(graph, img)
    node = await open_qcow2(graph, img, **{"read-only": True})
    assert bytes(await node.read(0, 4)) == b"\x07" * 4
    assert node.info()["format-specific"]["data"]["corrupt"] is True


async def test_default_backing_chain_and_null(graph, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "sub" / "mid.qcow2"
    mid.parent.mkdir()
    top = tmp_path / "sub" / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M")
    run("qemu-io", "-c", "write -P 1 0 1M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", str(mid))
    run("qemu-io", "-c", "write -P 2 0 512k", str(mid))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 3 0 64k", str(top))
    node = await open_qcow2(graph, top)
    data = await read_all(node)
    assert data == b"\x03" * 65536 + b"\x02" * (512 * 1024 - 65536) + b"\x01" * (512 * 1024)
    mid_node = node.backing
    assert mid_node is not None and mid_node.read_only
    assert mid_node.backing is not None and mid_node.backing.filename() == str(mid.parent / "../base.qcow2")  # as QEMU combines
    names = [n.node_name for n in graph.nodes()]
    assert "q" in names and len(names) == 6  # 3 x (qcow2 + file)
    info_ = node.info()
    assert info_["backing-filename"] == "mid.qcow2"
    # backing: null -> no backing, unallocated reads as zeroes
    ro = {"read-only": True, "force-share": True}  # the writer above does not share 'write'
    with pytest.raises(BlockError, match="lock"):
        await open_qcow2(graph, top, name="nob", backing=None, **{"read-only": True})
    node2 = await open_qcow2(graph, top, name="nob", backing=None, **ro)
    assert node2.backing is None
    assert bytes(await node2.read(65536, 10)) == bytes(10)
    # backing by node name
    node3 = await open_qcow2(graph, top, name="byname", backing=mid_node.node_name, **ro)
    assert node3.backing is mid_node
    # a second writer of the same image is refused by the file locks
    with pytest.raises(BlockError):
        await open_qcow2(graph, top, name="second")


async def test_truncate_grow_l1_and_shrink(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    base = tmp_path / "tb.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    run("qemu-io", "-c", "write -P 9 0 8M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", base.name,
        "-F", "qcow2", str(img), "2M")
    run("qemu-io", "-c", "write -P 5 0 1M", str(img))
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        l1_before = node.header.l1_table_offset
        await node.truncate(6 * MiB)  # 512-byte clusters: L1 must move
        assert node.header.l1_table_offset != l1_before
        assert node.getlength() == 6 * MiB
        # the grown area reads zeroes, not the (larger) backing file's data
        assert bytes(await node.read(2 * MiB, 4 * MiB)) == bytes(4 * MiB)
        await node.write(5 * MiB, b"\xaa" * 4096)
        with pytest.raises(OSError):
            await node.truncate(4 * MiB)  # data at 5 MiB would be lost
        with pytest.raises(OSError):
            await node.truncate(1000)  # not a multiple of 512
        await node.truncate(5 * MiB + 8192)  # only unallocated/zero space dropped
        assert node.getlength() == 5 * MiB + 8192
    finally:
        await g.close_all()
    check_clean(img)
    assert info(img)["virtual-size"] == 5 * MiB + 8192
    raw = to_raw(img, tmp_path / "t.raw")
    assert raw[: MiB] == b"\x05" * MiB and raw[MiB : 2 * MiB] == b"\x09" * MiB
    assert raw[2 * MiB : 5 * MiB] == bytes(3 * MiB) and raw[5 * MiB : 5 * MiB + 4096] == b"\xaa" * 4096


async def test_truncate_refused_with_snapshots_shrink(graph, tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "2M")
    run("qemu-img", "snapshot", "-c", "s", str(img))
    node = await open_qcow2(graph, img)
    with pytest.raises(OSError, match="snapshots"):
        await node.truncate(1 * MiB)
    await node.truncate(3 * MiB)
    await graph.close_all()
    check_clean(img)
    assert info(img)["virtual-size"] == 3 * MiB


async def test_header_extensions_preserved(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    img = tmp_path / "i.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(img), "1M")
    before = img.read_bytes()[:65536]
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        await node.write(0, b"x" * 70000)
        await node.truncate(2 * MiB)
    finally:
        await g.close_all()
    after = img.read_bytes()[:65536]
    # only the size field (24..31) changed in the first cluster
    assert before[:24] == after[:24] and before[32:] == after[32:]
    check_clean(img)
    assert info(img)["backing-filename-format"] == "qcow2"


async def test_bitmaps_kept_on_write_open(tmp_path: Path) -> None:
    """A bitmap made by qemu-img survives a read-write open and a write:
    the autoclear bit stays, the bitmap is stored back, the image is clean
    (tests/qcow2_bitmaps has the rest)."""
    img = tmp_path / "bm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    assert _get_u64(img, 88) & 1
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        await node.write(0, b"abc")
    finally:
        await g.close_all()
    assert _get_u64(img, 88) & 1
    r = run("qemu-img", "check", str(img), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b0"]


async def test_query_named_block_nodes_shows_chain(graph, tmp_path: Path) -> None:
    from exportd.block.query import named_block_nodes

    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    run("qemu-img", "snapshot", "-c", "snap1", str(top))
    await open_qcow2(graph, top, name="top")
    nodes = await named_block_nodes(graph.nodes())
    top_info = next(n for n in nodes if n["node-name"] == "top")
    assert top_info["backing_file_depth"] == 1
    img = top_info["image"]
    assert img["backing-filename"] == "base.qcow2"
    assert img["full-backing-filename"] == str(base)
    assert img["backing-filename-format"] == "qcow2"
    assert img["backing-image"]["cluster-size"] == 4096
    assert img["format-specific"]["data"]["compat"] == "1.1"
    assert [s["name"] for s in img["snapshots"]] == ["snap1"]
    assert len(nodes) == 4  # top, its file, base, its file


async def test_backing_loop_refused(graph, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(a), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", a.name, "-F", "qcow2", str(b))
    run("qemu-img", "rebase", "-u", "-b", b.name, "-F", "qcow2", str(a))  # a -> b -> a
    with pytest.raises(BlockError, match="loop"):
        await open_qcow2(graph, b)
    assert not graph.nodes()


HOSTILE = [  # (offset, struct format, value, expected message)
    (20, ">I", 30, "cluster size"),
    (20, ">I", 8, "cluster size"),
    (36, ">I", 0x7FFFFFFF, "L1 table too large"),
    (36, ">I", 0, "L1 table is too small"),
    (40, ">Q", 0x123, "L1 table offset"),
    (40, ">Q", 1 << 50, "outside the image"),
    (48, ">Q", 1 << 40, "outside the image"),
    (56, ">I", 0xFFFFFFFF, "Reference count table too large"),
    (56, ">I", 0, "Reference count table"),
    (60, ">I", 0xFFFFFFFF, "Too many snapshots"),
    (60, ">I", 1000, "Snapshot table"),
    (64, ">Q", 1 << 20, "snapshot table offset"),
    (16, ">I", 5000, "backing file name"),
    (8, ">Q", 1 << 30, "backing file name"),
    (4, ">I", 4, "version"),
    (96, ">I", 7, "64 bits"),
    (100, ">I", 1 << 30, "header"),
    (24, ">Q", (1 << 64) - 1, "L1 table"),
]


@pytest.mark.parametrize("off,fmt,value,msg", HOSTILE)
async def test_hostile_header_fields(graph, tmp_path: Path, off: int, fmt: str, value: int, msg: str) -> None:
    img = tmp_path / "h.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M")
    if off in (8, 16):  # backing name: offset beyond the first cluster, or too long
        with open(img, "r+b") as f:
            f.seek(8)
            f.write(struct.pack(">QI", 200, 10))
    if off == 64 or (off == 60 and value == 1000):
        with open(img, "r+b") as f:
            f.seek(60)
            f.write(struct.pack(">I", 1))
            f.seek(64)
            f.write(struct.pack(">Q", 3 * 4096 if off == 60 else (1 << 20) + 8))
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))
    with pytest.raises(BlockError, match=f"(?i){msg}"):
        await open_qcow2(graph, img, **{"read-only": True})
    assert not graph.nodes()


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
async def test_truncate_grow_with_preallocation(tmp_path: Path, mode: str) -> None:
    from exportd.block.node import Prealloc

    img = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M")
    run("qemu-io", "-c", "write -P 3 0 1M", str(img))
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        await node.truncate(3 * MiB, prealloc=Prealloc(mode))
    finally:
        await g.close_all()
    check_clean(img)
    qmap = __import__("json").loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
    assert all(e["present"] for e in qmap)  # every cluster allocated
    assert to_raw(img, tmp_path / "p.raw") == b"\x03" * MiB + bytes(2 * MiB)


async def test_unknown_bit_named_from_feature_table(graph, tmp_path: Path) -> None:
    img = tmp_path / "ft.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    data = bytearray(img.read_bytes())
    i = data.find(b"\x00\x04extended L2 entries")  # QEMU's own table names bit 4
    assert i > 0
    data[i + 1] = 9  # ... now call it bit 9
    name = b"future feature".ljust(46, b"\0")
    data[i + 2 : i + 48] = name
    img.write_bytes(bytes(data))
    _set_u64(img, 72, 1 << 9)
    with pytest.raises(BlockError, match="Unsupported qcow2 feature\\(s\\): future feature"):
        await open_qcow2(graph, img)


async def test_backing_as_nested_dict(graph, tmp_path: Path) -> None:
    base = tmp_path / "nb.qcow2"
    top = tmp_path / "nt.qcow2"
    other = tmp_path / "other.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    other.write_bytes(b"\x42" * MiB)
    node = await open_qcow2(graph, top, backing={"driver": "raw", "file": {"driver": "file",
                                                                         "filename": str(other)}})
    assert node.backing is not None and node.backing.driver == "raw" and node.backing.read_only
    assert bytes(await node.read(0, 8)) == b"\x42" * 8
    await node.write(0, b"hi")
    assert bytes(await node.read(0, 4)) == b"hi\x42\x42"


async def test_corruption_found_while_writing_marks_image(tmp_path: Path) -> None:
    img = tmp_path / "mc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1M")
    run("qemu-io", "-c", "write -P 1 0 8k", str(img))
    l1_off = _get_u64(img, 40)
    l2_off = _get_u64(img, l1_off) & 0x00FFFFFFFFFFFE00
    _set_u64(img, l2_off, (1 << 63) | 0x1234600)  # COPIED, misaligned host offset
    g = BlockGraph(None)
    try:
        node = await open_qcow2(g, img)
        with pytest.raises(OSError, match="corrupt"):
            await node.write(0, b"x" * 4096)
        with pytest.raises(OSError):
            await node.write(8192, b"y")  # no more writes once corruption was seen
        assert bytes(await node.read(4096, 4)) == b"\x01" * 4  # intact parts stay readable
    finally:
        await g.close_all()
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    g = BlockGraph(None)
    try:
        with pytest.raises(BlockError, match="corrupt"):
            await open_qcow2(g, img)
    finally:
        await g.close_all()
