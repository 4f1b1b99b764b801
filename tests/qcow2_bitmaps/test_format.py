"""The bitmaps extension as QEMU reads it: images with a damaged or unusual
bitmap directory (unknown flags, wrong counts, bad tables, an all-ones
table entry, a stale extension) are opened by exportd and by
qemu-storage-daemon 7.2 with the same results: the same errors, or the same
bitmaps with the same bits; and blockdev-reopen read-only and back stores
and marks the bitmaps as QEMU does."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.qcow2_bitmaps import qb
from tests.support.jobflow import Step, cmd

pytestmark = qb.needs_qsd

MiB = 1 << 20
EXT_BITMAPS = 0x23852875


def bitmaps_ext_at(img: Path) -> int:
    """File offset of the bitmaps extension's data."""
    head = img.read_bytes()[:65536]
    pos = struct.unpack_from(">I", head, 100)[0]  # header_length
    while True:
        etype, elen = struct.unpack_from(">II", head, pos)
        if etype == EXT_BITMAPS:
            return pos + 8
        assert etype != 0, "no bitmaps extension"
        pos += 8 + ((elen + 7) & ~7)


def patch(img: Path, offset: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def read(img: Path, offset: int, fmt: str) -> tuple[Any, ...]:
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def dir_offset(img: Path) -> int:
    return read(img, bitmaps_ext_at(img) + 16, ">Q")[0]


def entry0(img: Path) -> int:
    return dir_offset(img)


def table0(img: Path) -> int:
    return read(img, entry0(img), ">Q")[0]


# name -> how the image is damaged (entry 0 is b0, a 1 MiB image, one table entry)
DAMAGE: dict[str, Callable[[Path], None]] = {
    "good": lambda img: None,
    "flag": lambda img: patch(img, entry0(img) + 12, ">I", 1 << 2 | 2),
    "type": lambda img: patch(img, entry0(img) + 16, ">B", 2),
    "granularity": lambda img: patch(img, entry0(img) + 17, ">B", 8),
    "extra": lambda img: patch(img, entry0(img) + 20, ">I", 8),
    "tablesize0": lambda img: patch(img, entry0(img) + 8, ">I", 0),
    "tablesize2": lambda img: patch(img, entry0(img) + 8, ">I", 2),
    "tableoffset": lambda img: patch(img, entry0(img), ">Q", table0(img) + 512),
    "more": lambda img: patch(img, bitmaps_ext_at(img), ">I", 1),
    "less": lambda img: patch(img, bitmaps_ext_at(img), ">I", 3),
    "zero": lambda img: patch(img, bitmaps_ext_at(img), ">I", 0),
    "reserved": lambda img: patch(img, bitmaps_ext_at(img) + 4, ">I", 1),
    "dirsize": lambda img: patch(img, bitmaps_ext_at(img) + 8, ">Q", 1 << 40),
    "dirsize0": lambda img: patch(img, bitmaps_ext_at(img) + 8, ">Q", 0),
    "diroffset": lambda img: patch(img, bitmaps_ext_at(img) + 16, ">Q", dir_offset(img) + 8),
    "dirfar": lambda img: patch(img, bitmaps_ext_at(img) + 16, ">Q", 1 << 30),
    "tablefar": lambda img: patch(img, entry0(img), ">Q", 1 << 30),
    "datafar": lambda img: patch(img, table0(img), ">Q", 1 << 30),
    "entry-reserved": lambda img: patch(img, table0(img), ">Q", read(img, table0(img), ">Q")[0] | 2),
    "entry-all-ones": lambda img: patch(img, table0(img), ">Q", 1),
    "entry-zero": lambda img: patch(img, table0(img), ">Q", 0),
    "in-use": lambda img: patch(img, entry0(img) + 12, ">I", 3),
    "stale": lambda img: patch(img, 88, ">Q", 0),  # autoclear bit clear: a program without bitmaps wrote
}


def damaged_images(d: Path) -> None:
    base = d / "base.qcow2"
    qb.run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(MiB))
    qb.run("qemu-img", "bitmap", "--add", "-g", "4096", str(base), "b0")
    qb.run("qemu-img", "bitmap", "--add", "--disable", str(base), "b1")
    qb.run("qemu-io", "-f", "qcow2", "-c", "write 4k 12k", "-c", "write 500k 1k", str(base))
    for name, damage in DAMAGE.items():
        img = d / f"{name}.qcow2"
        shutil.copy(base, img)
        damage(img)


def opening_script(d: Path) -> list[Step]:
    steps: list[Step] = []
    for name in DAMAGE:
        node = name.replace("-", "_")
        steps += [
            cmd("blockdev-add", driver="qcow2", node_name=node, read_only=name != "stale",
                file={"driver": "file", "filename": str(d / f"{name}.qcow2")}),
            qb.sha("b0", node), qb.sha("b1", node),
        ]
    steps.append(qb.QUERY)
    return steps


async def test_damaged_directories_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    results = {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        work.mkdir()
        damaged_images(work)
        results[who] = await qb.replies_on(who, work / "qmp.sock", opening_script(work), daemon)
    steps = [s for s in opening_script(tmp_path) if s[0] == "cmd"]
    for step, ours, theirs in zip(steps, results["exportd"], results["qsd"], strict=True):
        assert ours == theirs, json.dumps([step[1], step[2].get("node-name"), ours, theirs])
    ours = results["exportd"]
    # the cases really differ: errors for the broken ones, bits for the others
    errors = {s[2]["node-name"]: r["error"][1] for s, r in zip(steps, ours, strict=True)
              if s[1] == "blockdev-add" and "error" in r}
    assert errors["flag"] == "Bitmap 'b0' doesn't satisfy the constraints"
    assert errors["less"] == "Less bitmaps found than specified in header extension"
    assert "good" not in errors and "entry_all_ones" not in errors and "stale" not in errors
    nodes = ours[-1]
    assert nodes["stale"] is None or nodes["stale"] == []
    assert {b["name"]: b["count"] for b in nodes["entry_all_ones"]}["b0"] == MiB
    # the stale extension is gone from the image exportd opened read-write
    assert qb.image_bitmaps(tmp_path / "exportd" / "stale.qcow2") is None
    assert qb.image_bitmaps(tmp_path / "qsd" / "stale.qcow2") is None


def reopen_script(d: Path, infos: list[Any]) -> list[Step]:
    nbd = d / "nbd.sock"
    img = d / "a.qcow2"

    def reopen(read_only: bool) -> Step:
        return cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q", "file": "f",
                                                "read-only": read_only}])

    def export() -> Step:
        return ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a",
                                            "writable": True})

    return [
        cmd("blockdev-add", driver="file", node_name="f", filename=str(img)),
        cmd("blockdev-add", driver="qcow2", node_name="q", file="f"),
        qb.bm("add", "p", persistent=True),
        qb.bm("add", "d", persistent=True, disabled=True, granularity=4096),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        export(),
        ("call", lambda: qb.qemu_io(nbd, "write 0 64k", "write 3M 4097")),
        cmd("block-export-del", id="e"),
        ("sleep", 0.2),
        reopen(True),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),  # stored, not in use
        qb.QUERY, qb.sha("p"), qb.sha("old"),
        qb.bm("clear", "p"), qb.bm("remove", "p"), qb.bm("enable", "d"), qb.bm("disable", "d"),
        reopen(False),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),  # in use again
        qb.bm("clear", "old"),
        export(),
        ("call", lambda: qb.qemu_io(nbd, "write 2M 1k")),
        cmd("block-export-del", id="e"),
        ("sleep", 0.2),
        qb.QUERY, qb.sha("p"), qb.sha("d"), qb.sha("old"),
        qb.bm("remove", "old"),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        cmd("blockdev-del", node_name="q"),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        # opened read-only, then made writable
        cmd("blockdev-add", driver="qcow2", node_name="q", file="f", read_only=True),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        qb.QUERY, qb.bm("clear", "p"),
        reopen(False),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        qb.QUERY, qb.bm("clear", "p"), qb.bm("add", "late", persistent=True), qb.sha("p"), qb.sha("d"),
        cmd("blockdev-del", node_name="q"),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        cmd("blockdev-del", node_name="f"),
        cmd("nbd-server-stop"),
    ]


async def test_reopen_read_only_and_back_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    results, infos = {}, {}
    for who in ("qsd", "exportd"):
        work = tmp_path / who
        img = qb.new_image(work, 4 * MiB, "old")
        infos[who] = []
        results[who] = await qb.replies_on(who, work / "qmp.sock", reopen_script(work, infos[who]), daemon)
        qb.run("qemu-img", "check", str(img))
    steps = [s for s in reopen_script(tmp_path, []) if s[0] == "cmd"]
    for step, ours, theirs in zip(steps, results["exportd"], results["qsd"], strict=True):
        assert ours == theirs, json.dumps([step[1], ours, theirs])
    assert infos["exportd"] == infos["qsd"], infos
    assert infos["exportd"][0] == [{"flags": ["auto"], "name": "old", "granularity": 65536},
                                   {"flags": [], "name": "d", "granularity": 4096},
                                   {"flags": ["auto"], "name": "p", "granularity": 65536}]
    assert all("in-use" in b["flags"] for b in infos["exportd"][1])
    assert infos["exportd"][4] == infos["exportd"][3]  # a read-only open leaves the image alone
    assert all("in-use" in b["flags"] for b in infos["exportd"][5])
    assert [b["name"] for b in infos["exportd"][6]] == ["d", "p", "late"]


async def test_read_only_open_leaves_the_image_alone(tmp_path: Path) -> None:
    """Opened read-only, the bitmaps are readonly and not one byte of the
    image changes, not even for a persistent bitmap added meanwhile (QEMU
    cannot store it either: it is lost at close)."""
    from exportd.block import bitmaps
    from exportd.block.graph import BlockGraph
    from exportd.errors import BlockError

    damaged_images(tmp_path)
    img = tmp_path / "good.qcow2"
    before = img.read_bytes()
    g = BlockGraph(None)
    try:
        node = await g.add({"driver": "qcow2", "node-name": "q", "read-only": True,
                            "file": {"driver": "file", "filename": str(img)}})
        assert [(b.name, b.readonly, b.enabled) for b in node.dirty_bitmaps] == [("b1", True, False),
                                                                               ("b0", True, True)]
        assert node.dirty_bitmaps[1].count() == 16384
        with pytest.raises(BlockError, match="Bitmap 'b0' is readonly and cannot be modified"):
            node.dirty_bitmaps[1].check(bitmaps.Use.DEFAULT)
        bitmaps.attach(bitmaps.create(node, "new", persistent=True))
    finally:
        await g.close_all()
    assert img.read_bytes() == before


async def test_limits_of_the_bitmap_directory(tmp_path: Path) -> None:
    """qcow2_co_can_store_new_dirty_bitmap's count and directory-size limits
    (65535 bitmaps, 64 MiB of directory), with QEMU's texts."""
    from exportd.block import bitmaps
    from exportd.block.graph import BlockGraph
    from exportd.errors import BlockError

    img = qb.new_image(tmp_path / "w", MiB)
    g = BlockGraph(None)
    try:
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}})
        many = [bitmaps.DirtyBitmap(node, f"b{i}", 65536, persistent=True) for i in range(65534)]
        node.dirty_bitmaps[:] = many
        node.check_can_store_bitmap("one-more", 65536)  # the 65535th fits
        node.dirty_bitmaps.append(bitmaps.DirtyBitmap(node, "last", 65536, persistent=True))
        with pytest.raises(BlockError) as e:
            node.check_can_store_bitmap("too-many", 65536)
        assert str(e.value) == ("Can't make bitmap 'too-many' persistent in 'q': "
                                "Maximum number of persistent bitmaps is already reached")
        # long names fill the directory first: 1048 bytes an entry
        node.dirty_bitmaps[:] = [bitmaps.DirtyBitmap(node, f"{i:05}" + "n" * 1018, 65536, persistent=True)
                                 for i in range(64034)]
        with pytest.raises(BlockError) as e:
            node.check_can_store_bitmap("y" * 1023, 65536)
        assert str(e.value) == (f"Can't make bitmap '{'y' * 1023}' persistent in 'q': "
                                "Not enough space in the bitmap directory")
        node.check_can_store_bitmap("short", 65536)
        with pytest.raises(BlockError, match="Granularity exceeds maximum \\(2147483648 bytes\\)"):
            node.check_can_store_bitmap("g", 1 << 32)
        node.dirty_bitmaps.clear()
    finally:
        await g.close_all()


async def test_failed_reopen_read_only_marks_the_bitmaps_in_use_again(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    """A reopen to read-only stores the bitmaps in its first phase; when it
    then fails (a writable export holds the write permission), the node stays
    writable and its bitmaps are marked in use again and go on recording.
    (QEMU 7.2 leaves them readonly in memory and not in use on disk, and
    refuses writes to the node from then on; exportd does not copy that.)"""
    img = qb.new_image(tmp_path / "w", 4 * MiB, "b0")
    nbd = tmp_path / "nbd.sock"
    infos: list[Any] = []
    steps = [
        cmd("blockdev-add", driver="file", node_name="f", filename=str(img)),
        cmd("blockdev-add", driver="qcow2", node_name="q", file="f"),
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}}),
        ("cmd", "block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "a", "writable": True}),
        cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q", "file": "f", "read-only": True}]),
        ("call", lambda: infos.append(qb.image_bitmaps(img))),
        ("call", lambda: qb.qemu_io(nbd, "write 1M 4k")),
        qb.QUERY,
        cmd("block-export-del", id="e"),
        cmd("nbd-server-stop"),
    ]
    replies = await qb.replies_on("exportd", tmp_path / "e.sock", steps, daemon)
    assert "error" in replies[4], replies[4]
    assert infos == [[{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}]]
    assert replies[5]["q"] == [{"name": "b0", "recording": True, "persistent": True, "busy": False,
                                "granularity": 65536, "count": 65536}]
    assert qb.image_bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    qb.run("qemu-img", "check", str(img))
