"""Image locking across processes: exportd against exportd, and against
qemu-img / qemu-io, which use the same OFD lock bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.locking import PERM_BASE, SHARED_BASE, byte_locked_by_others
from exportd.block.node import Perm
from exportd.errors import BlockError
from tests.support import SUPPORT_DIR
from tests.support.images import make_pattern_image as make_image

PEER = str(SUPPORT_DIR / "lockpeer.py")
READ = Perm.CONSISTENT_READ
WRITE = Perm.WRITE
# what a format node such as qcow2 takes on its file: it never shares writes
FORMAT_RW = (READ | WRITE | Perm.RESIZE, Perm.ALL & ~(WRITE | Perm.RESIZE))
FORMAT_RO = (READ, Perm.ALL & ~(WRITE | Perm.RESIZE))
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


@contextmanager
def peer(path: Path, perm: Perm, shared: Perm, *extra: str) -> Iterator[str]:
    """Run lockpeer.py; yields its first line ("OK" / "ERR ...") while it holds."""
    proc = subprocess.Popen(
        [sys.executable, PEER, str(path), str(int(perm)), str(int(shared)), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=20)


def lock_error(path: Path, what: str) -> str:
    return f"ERR {what}|Is another process using the image [{path}]?"


async def test_second_writer_refused_both_ways(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "l.img"
    make_image(path, 65536, pattern=False)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    user = f.attach("format", *FORMAT_RW)
    # we use write and do not share it: bytes 101 and 201 are ours
    assert f._lock.perm & WRITE and f._lock.unshared & WRITE
    with peer(path, READ | WRITE, Perm.ALL) as answer:
        assert answer == lock_error(path, 'Failed to get "write" lock')
    with peer(path, *FORMAT_RW) as answer:
        assert answer == lock_error(path, 'Failed to get "write" lock')
    with peer(path, READ, Perm.ALL, "read-only") as answer:  # a reader that shares all: fine
        assert answer == "OK"
    with peer(path, *FORMAT_RO, "read-only") as answer:  # refuses to share write we hold
        assert answer == lock_error(path, 'Failed to get shared "write" lock')
    f.detach(user)
    assert not f._lock.perm and not f._lock.unshared
    # now the peer is first, and we are refused
    with peer(path, *FORMAT_RW) as answer:
        assert answer == "OK"
        with pytest.raises(BlockError) as e:
            f.attach("format", *FORMAT_RW)
        assert e.value.desc == f'Failed to get "write" lock\nIs another process using the image [{path}]?'
        assert f.refcount == 0 and not f._lock.perm  # the refusal left nothing behind
        assert f.lock_holders() == {"used": ["consistent read", "write", "resize"],
                                    "unshared": ["write", "resize"]}
    # the peer exited and its locks went with it
    f.attach("format", *FORMAT_RW)


async def test_read_only_sharing(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    make_image(path, 4096)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path), "read-only": True})
    f.attach("format", *FORMAT_RO)
    with peer(path, *FORMAT_RO, "read-only") as a, peer(path, *FORMAT_RO, "read-only") as b:
        assert a == b == "OK"
    with peer(path, *FORMAT_RW) as answer:
        assert answer == lock_error(path, 'Failed to get "write" lock')


async def test_locking_off_takes_no_locks(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "o.img"
    make_image(path, 4096)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path), "locking": "off"})
    f.attach("format", *FORMAT_RW)
    with peer(path, *FORMAT_RW) as answer:
        assert answer == "OK"
    g = await graph.add({"driver": "file", "node-name": "g", "filename": str(path), "read-only": True})
    assert not byte_locked_by_others(g.fd, PERM_BASE + 1)
    assert not byte_locked_by_others(g.fd, SHARED_BASE + 1)


async def test_two_nodes_in_one_process_conflict(graph: BlockGraph, tmp_path: Path) -> None:
    """OFD locks belong to the open file description: two nodes on one file in
    one daemon see each other, as in QEMU."""
    path = tmp_path / "t.img"
    make_image(path, 4096)
    a = await graph.add({"driver": "file", "node-name": "a", "filename": str(path)})
    b = await graph.add({"driver": "file", "node-name": "b", "filename": str(path)})
    a.attach("format", *FORMAT_RW)
    with pytest.raises(BlockError, match='Failed to get "write" lock'):
        b.attach("format", *FORMAT_RW)


@needs_qemu
async def test_qemu_tools_see_our_locks(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "q.img"
    make_image(path, 65536)
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    user = f.attach("export", READ | WRITE, Perm.ALL)  # a writable raw export
    out = tmp_path / "copy.img"
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(path), str(out)]
    r = subprocess.run(convert, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0  # convert wants a source nobody writes to
    assert 'Failed to get shared "write" lock' in r.stderr
    assert f"Is another process using the image [{path}]?" in r.stderr
    r = subprocess.run(convert[:2] + ["-U"] + convert[2:], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr  # -U: force-share
    # a raw writer shares writes, so a qemu-io writer that shares too gets in
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    f.detach(user)
    r = subprocess.run(convert, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # as a format would: no shared writes, so a qemu-io writer is refused
    f.attach("format", *FORMAT_RW)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stdout + r.stderr


@needs_qemu
async def test_qemu_io_qcow2_writer_blocks_us(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    qio = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert qio.stdin is not None and qio.stdout is not None
        qio.stdin.write("help\n")  # answered only once the image is open (and locked)
        qio.stdin.flush()
        qio.stdout.readline()
        f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
        with pytest.raises(BlockError) as e:
            f.attach("format", *FORMAT_RW)
        assert e.value.desc.startswith('Failed to get "write" lock')
        f.attach("reader", READ, Perm.ALL)  # sharing readers are welcome
    finally:
        qio.communicate("quit\n", timeout=20)
    # and the other way round: qemu-io cannot open it for writing while we hold it
    f2 = await graph.add({"driver": "file", "node-name": "f2", "filename": str(path)})
    f2.attach("format", *FORMAT_RW)
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and 'Failed to get "write" lock' in out.stdout + out.stderr
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 512", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
