"""blockdev-reopen on a BlockGraph: read-only <-> read-write on file, raw and
qcow2 (descriptor and OFD locks included), a new backing node, all or
nothing, and Qcow2Node.set_backing_file checked by qemu-img."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.locking import PERM_BASE, byte_locked_by_others
from exportd.block.node import Perm
from exportd.block.reopen import reopen_many, set_read_only
from exportd.errors import BlockError

MiB = 1 << 20


async def expect(coro, text: str) -> None:  # noqa: ANN001
    with pytest.raises(BlockError) as e:
        await coro
    assert e.value.desc == text


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def info(path: Path) -> dict:
    r = qemu_img("info", "-U", "--output=json", str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_clean(path: Path, *, live: bool = False) -> None:
    r = qemu_img("check", *(["-U"] if live else []), str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


def access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def write_lock_held(path: Path) -> bool:
    """Whether some open file description of `path` holds QEMU's "uses write"
    lock byte (what makes a second writer fail with 'Failed to get "write" lock')."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return byte_locked_by_others(fd, PERM_BASE + 1)
    finally:
        os.close(fd)


async def test_file_and_raw_ro_rw_ro(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(b"a" * MiB)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path), "read-only": True})
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f", "read-only": True})
    fd = f.fd
    assert access_mode(fd) == os.O_RDONLY
    with pytest.raises(OSError):
        await r.write(0, b"x" * 512)
    await reopen_many(graph, [{"driver": "file", "node-name": "f", "filename": str(path)},
                              {"driver": "raw", "node-name": "r", "file": "f"}])
    assert not f.read_only and not r.read_only
    assert f.fd == fd and access_mode(fd) == os.O_RDWR  # same number, new description
    writer = object()
    edge = r.attach(writer, Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ)
    assert write_lock_held(path)  # our write lock, on the new description
    await r.write(0, b"x" * 512)
    await r.flush()
    assert path.read_bytes()[:513] == b"x" * 512 + b"a"
    # a writer keeps the node writable
    await expect(reopen_many(graph, [{"driver": "raw", "node-name": "r", "file": "f", "read-only": True}]),
                 "Read-only block node 'r' cannot support read-write users")
    assert not r.read_only and not f.read_only
    r.detach(edge)
    assert not write_lock_held(path)
    await set_read_only(graph, r, True)  # the file follows
    assert r.read_only and f.read_only and access_mode(f.fd) == os.O_RDONLY
    assert (await r.read(0, 512)) == b"x" * 512
    assert f.options["read-only"] and r.options["file"] == "f"


async def test_qcow2_ro_rw_ro_and_locks(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "q.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(path), "4M").returncode == 0
    q = await graph.add({"driver": "qcow2", "node-name": "q", "read-only": True,
                         "file": {"driver": "file", "filename": str(path), "node-name": "qf"}})
    qf = graph.get("qf")
    assert qf.read_only
    assert not write_lock_held(path)
    await set_read_only(graph, q, False)
    assert not q.read_only and not qf.read_only
    assert write_lock_held(path)  # the qcow2 node holds write on its file
    await q.write(4096, b"\x5a" * 65536)
    await q.flush()
    check_clean(path, live=True)
    await set_read_only(graph, q, True)
    assert q.read_only and qf.read_only and not write_lock_held(path)
    check_clean(path)
    r = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 4096 64k", str(path)],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout
    await set_read_only(graph, q, False)  # and back again, allocating more
    await q.write(2 * MiB, b"\x11" * 65536)
    await graph.delete("q")
    check_clean(path)


async def test_dirty_image_stays_read_only(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "1M").returncode == 0
    with open(path, "r+b") as fh:  # set the dirty bit as a crash with lazy refcounts leaves it
        fh.seek(72)
        fh.write((1).to_bytes(8, "big"))
    q = await graph.add({"driver": "qcow2", "node-name": "q", "read-only": True,
                         "file": {"driver": "file", "filename": str(path), "node-name": "qf"}})
    with pytest.raises(BlockError) as e:
        await set_read_only(graph, q, False)
    assert "dirty bit" in e.value.desc
    assert q.read_only and graph.get("qf").read_only  # nothing changed, the file included
    assert access_mode(graph.get("qf").fd) == os.O_RDONLY


async def test_refusals_change_nothing(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    await expect(reopen_many(graph, [{"driver": "file", "node-name": "f", "filename": "/x"}]),
                 "Cannot change the option 'filename'")
    await expect(reopen_many(graph, [{"driver": "file", "node-name": "f", "filename": str(path),
                                      "locking": "off"}]), "Cannot change the option 'locking'")
    await expect(reopen_many(graph, [{"driver": "raw", "node-name": "f", "file": "x"}]),
                 "Cannot change the option 'driver'")
    await expect(reopen_many(graph, [{"driver": "raw", "file": "f"}]), "node-name not specified")
    await expect(reopen_many(graph, [{"driver": "raw", "node-name": "zz", "file": "f"}]),
                 "Cannot find device='' nor node-name='zz'")
    # all or nothing: the first node would change, the second cannot
    await graph.add({"driver": "raw", "node-name": "r", "file": "f"})
    await expect(reopen_many(graph, [{"driver": "file", "node-name": "f", "filename": str(path),
                                      "read-only": True},
                                     {"driver": "raw", "node-name": "r", "file": "f", "size": 3}]),
                 "Specified size is not multiple of 512")
    assert not f.read_only and access_mode(f.fd) == os.O_RDWR
    # live options: discard, detect-zeroes, cache.no-flush, a raw window
    await reopen_many(graph, [{"driver": "file", "node-name": "f", "filename": str(path), "discard": "unmap",
                               "detect-zeroes": "unmap", "cache": {"no-flush": True}}])
    assert f.discard_unmap and f.cache_no_flush and f.options["detect-zeroes"] == "unmap"
    r = graph.get("r")
    await reopen_many(graph, [{"driver": "raw", "node-name": "r", "file": "f", "offset": 4096, "size": 8192}])
    assert r.getlength() == 8192 and r.offset == 4096


async def test_new_backing(graph: BlockGraph, tmp_path: Path) -> None:
    base, other, top = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "top.qcow2"
    for p in (base, other):
        assert qemu_img("create", "-q", "-f", "qcow2", str(p), "1M").returncode == 0
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 64k", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x6f 0 64k", str(other)], check=True,
                   capture_output=True)
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)).returncode == 0
    await graph.add({"driver": "qcow2", "node-name": "base", "read-only": True,
                     "file": {"driver": "file", "filename": str(base)}})
    await graph.add({"driver": "qcow2", "node-name": "other", "read-only": True,
                     "file": {"driver": "file", "filename": str(other)}})
    t = await graph.add({"driver": "qcow2", "node-name": "top", "backing": "base",
                         "file": {"driver": "file", "filename": str(top), "node-name": "top-file"}})
    opts = {"driver": "qcow2", "node-name": "top", "file": "top-file"}
    assert bytes(await t.read(0, 4)) == b"bbbb"
    await expect(reopen_many(graph, [opts]), "backing is missing for 'top'")
    await expect(reopen_many(graph, [dict(opts, backing="top")]),
                 "Making 'top' a backing child of 'top' would create a cycle")
    await expect(reopen_many(graph, [dict(opts, backing="nope")]), "Cannot find device='' nor node-name='nope'")
    await reopen_many(graph, [dict(opts, backing="other")])
    assert t.backing is graph.get("other") and bytes(await t.read(0, 4)) == b"oooo"
    assert [e.parent for e in graph.get("base").users] == []
    await expect(graph.delete("other"), "Node 'other' is busy: node is used as backing hd of 'top'")
    await reopen_many(graph, [dict(opts, backing=None)])
    assert t.backing is None and bytes(await t.read(0, 4)) == bytes(4)
    await graph.delete("other")
    await reopen_many(graph, [dict(opts, backing="base")])
    assert bytes(await t.read(0, 4)) == b"bbbb"
    # the header is the job of set_backing_file, not of reopen
    assert info(top)["backing-filename"] == str(base)


async def test_set_backing_file(graph: BlockGraph, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    assert qemu_img("create", "-q", "-f", "raw", str(base), "1M").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)).returncode == 0
    t = await graph.add({"driver": "qcow2", "node-name": "top",
                         "file": {"driver": "file", "filename": str(top)}})
    await t.write(0, b"\x33" * 4096)
    await t.set_backing_file("base.qcow2-renamed-but-long" * 3, "qcow2")
    i = info(top)
    assert i["backing-filename"] == "base.qcow2-renamed-but-long" * 3
    assert i["backing-filename-format"] == "qcow2"
    await t.set_backing_file("b.img", None)  # shorter, and no format extension
    i = info(top)
    assert i["backing-filename"] == "b.img" and "backing-filename-format" not in i
    await t.set_backing_file(None, None)
    i = info(top)
    assert "backing-filename" not in i and "backing-filename-format" not in i
    await expect(t.set_backing_file(None, "raw"), "Backing format cannot be used without backing file")
    await t.set_backing_file(str(base), "raw")
    await t.write(8192, b"\x44" * 4096)
    await graph.delete("top")
    i = info(top)
    assert i["backing-filename"] == str(base) and i["backing-filename-format"] == "raw"
    check_clean(top)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 4k", "-c", "read -P 0x44 8k 4k",
                        "-c", "read -P 0 16k 4k", str(top)], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


async def test_nested_child_options(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    r = await graph.add({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(path)}})
    f = r.child("file")
    assert not f.monitor_owned
    # QEMU: a generated node name was never an option, so naming it is a change
    await expect(reopen_many(graph, [{"driver": "file", "node-name": f.node_name, "filename": str(path)}]),
                 "Cannot change the option 'node-name'")
    # the nested options reopen the current child (and inherit read-only)
    await reopen_many(graph, [{"driver": "raw", "node-name": "r", "read-only": True,
                               "file": {"driver": "file", "filename": str(path), "discard": "unmap"}}])
    assert r.read_only and f.read_only and f.discard_unmap and r.child("file") is f
    await expect(reopen_many(graph, [{"driver": "raw", "node-name": "r",
                                      "file": {"driver": "null-co"}}]), "Cannot change the option 'file.driver'")
    await reopen_many(graph, [{"driver": "raw", "node-name": "r", "file": f.node_name}])
    assert not r.read_only and f.read_only  # the child keeps its state unless read-only is stated
    await reopen_many(graph, [{"driver": "raw", "node-name": "r", "file": f.node_name, "read-only": False}])
    assert not f.read_only and access_mode(f.fd) == os.O_RDWR
