"""The raw format driver: windows, permissions forwarded to the file, errors."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.node import Perm, Status
from exportd.block.raw import RawNode
from exportd.errors import BlockError
from tests.support.images import make_pattern_image as make_image

KiB = 1024


async def test_window_never_reads_or_writes_outside(graph: BlockGraph, imgdir: Path) -> None:
    path = imgdir / "w.img"
    model = make_image(path, 64 * KiB)
    r = await graph.add({
        "driver": "raw", "node-name": "r", "offset": 4 * KiB + 3, "size": 8 * KiB,
        "file": {"driver": "file", "filename": str(path), "discard": "unmap"},
    })
    assert isinstance(r, RawNode) and r.getlength() == 8 * KiB
    lo, hi = 4 * KiB + 3, 12 * KiB + 3
    assert bytes(await r.read(0, 8 * KiB)) == bytes(model[lo:hi])
    # a read reaching past the window gets zeroes there, not the file's bytes
    got = bytes(await r.read(8 * KiB - 10, 30))
    assert got == bytes(model[hi - 10 : hi]) + bytes(20)
    await r.write(0, b"A" * 7)
    await r.write(8 * KiB - 5, b"Z" * 5)
    model[lo : lo + 7] = b"A" * 7
    model[hi - 5 : hi] = b"Z" * 5
    for bad in ((8 * KiB - 4, b"12345"), (8 * KiB, b"x"), (10**9, b"y")):
        with pytest.raises(OSError) as e:
            await r.write(*bad)
        assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        await r.write_zeroes(8 * KiB - 1, 2)
    await r.write_zeroes(100, 50)
    model[lo + 100 : lo + 150] = bytes(50)
    await r.discard(4 * KiB, 64 * KiB)  # clamped to the window's end
    model[lo + 4 * KiB : hi] = bytes(hi - lo - 4 * KiB)
    with pytest.raises(OSError):
        await r.truncate(16 * KiB)
    await r.flush()
    assert path.read_bytes() == bytes(model)  # everything outside is untouched
    st = await r.block_status(4 * KiB, 64 * KiB)
    assert 0 < st.length <= 4 * KiB
    assert bool(st.status & Status.EOF) == (4 * KiB + st.length == 8 * KiB)
    st = await r.block_status(0, 64 * KiB)
    assert st.status & Status.DATA and 0 < st.length <= 8 * KiB


async def test_window_to_end_follows_the_file(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "e.img"
    model = make_image(path, 32 * KiB)
    await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f", "offset": 1000})
    assert r.getlength() == 32 * KiB - 1000
    assert r.filename().startswith("json:") and '"offset": 1000' in r.filename()
    assert bytes(await r.read(0, 100)) == bytes(model[1000:1100])
    r.attach("export", Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.ALL)
    await r.truncate(64 * KiB)
    assert path.stat().st_size == 64 * KiB + 1000 and r.getlength() == 64 * KiB
    plain = await graph.add({"driver": "raw", "node-name": "p", "file": "f"})
    assert plain.filename() == str(path) and plain.host_fd() == graph.get("f").fd
    assert isinstance(r.host_fd(), str)  # the reason there is no plain host descriptor


async def test_permissions_forwarded_to_file(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    make_image(path, 8 * KiB)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f"})
    assert f.combined_perm() == (Perm(0), Perm.ALL)
    user = r.attach("export", Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL & ~Perm.RESIZE)
    assert f.combined_perm() == (Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL & ~Perm.RESIZE)
    r.update(user, Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.ALL)
    assert f.combined_perm()[0] & Perm.RESIZE
    # another user of the file that does not share resize now conflicts, via raw
    with pytest.raises(BlockError):
        f.attach("other", Perm.CONSISTENT_READ, Perm.ALL & ~Perm.RESIZE)
    r.detach(user)
    assert f.combined_perm() == (Perm(0), Perm.ALL)


async def test_open_errors_verbatim(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "s.img"
    make_image(path, 1 << 20)
    await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    cases = [
        ({"offset": 1 << 30}, "Offset (1073741824) cannot be greater than size of the containing file (1048576)"),
        ({"offset": 4096, "size": 1 << 20},
         "The sum of offset (4096) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)"),
        ({"size": 1000}, "Specified size is not multiple of 512"),
    ]
    for extra, text in cases:
        with pytest.raises(BlockError) as e:
            await graph.add({"driver": "raw", "node-name": "r", "file": "f", **extra})
        assert e.value.desc == text
        # the failed node left nothing behind: no node, no user on f
        assert [n.node_name for n in graph.nodes()] == ["f"] and graph.get("f").refcount == 0
    with pytest.raises(BlockError) as e:
        await graph.add({"driver": "raw", "node-name": "r", "file": "nope"})
    assert e.value.desc == "Cannot find device='nope' nor node-name='nope'"
    with pytest.raises(BlockError) as e:
        await graph.add({"driver": "raw", "node-name": "r",
                         "file": {"driver": "file", "filename": str(path)}, "offset": 1 << 30})
    assert [n.node_name for n in graph.nodes()] == ["f"]  # the nested child went too
    with pytest.raises(BlockError, match="Parameter 'file' is missing"):
        await graph.add({"driver": "raw", "node-name": "r"})


async def test_raw_over_read_only_file(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    make_image(path, 4096)
    await graph.add({"driver": "file", "node-name": "f", "filename": str(path), "read-only": True})
    # opens, as in QEMU; a writer is refused when it attaches
    rw = await graph.add({"driver": "raw", "node-name": "rw", "file": "f"})
    assert not rw.read_only
    with pytest.raises(BlockError, match="Block node is read-only"):
        rw.attach("export", Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL)
    assert rw.refcount == 0
    rw.attach("reader", Perm.CONSISTENT_READ, Perm.ALL)
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f", "read-only": True})
    assert r.read_only
    # a nested child inherits read-only from its parent
    r2 = await graph.add({"driver": "raw", "node-name": "r2", "read-only": True,
                          "file": {"driver": "file", "filename": str(path)}})
    assert r2.children["file"].read_only


async def test_resize_needs_the_permission(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "rs.img"
    make_image(path, 8 * KiB)
    await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f"})
    user = r.attach("export", Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL)
    with pytest.raises(OSError) as e:
        await r.truncate(16 * KiB)
    assert e.value.errno == errno.EPERM and path.stat().st_size == 8 * KiB
    r.update(user, user.perm | Perm.RESIZE, user.shared)  # as an export does for one truncate
    await r.truncate(16 * KiB)
    assert path.stat().st_size == 16 * KiB and r.getlength() == 16 * KiB
