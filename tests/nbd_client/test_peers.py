"""The nbd driver against real servers: qemu-nbd, nbdkit (memory, file,
curl in front of a local web server) and qemu-storage-daemon 7.2's NBD
export, each time through a FUSE export of the nbd node, checked with
tools that are not exportd (qemu-img, the image file itself)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.daemon import Exportd
from tests.support.nbdpeer import Peer, free_port, nbdkit, need, qemu_nbd
from tests.support.qsd import QSD
from tests.support.threads import athread

MiB = 1 << 20


def pattern(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: Path) -> bytes:
    return path.read_bytes()


def unix(sock: str) -> dict[str, str]:
    return {"type": "unix", "path": sock}


async def export_nbd(d: Exportd, workdir: Path, sock: str, *, writable: bool = True, **opts: object) -> Path:
    await d.cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "server": unix(sock), **opts})
    mnt = workdir / "mnt"
    mnt.touch()
    await d.add_export("e", "n", mnt, writable=writable)
    return mnt


def seek(path: Path, offset: int, whence: int) -> int | str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, whence)
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)


async def test_qemu_nbd_qcow2(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """qemu-nbd decodes a qcow2 image; the nbd node serves its guest view,
    reads and writes through the mount land in the image."""
    img = workdir / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x33 5M 1M",
                    str(img)], check=True, capture_output=True)
    peers.append(qemu_nbd(sock, str(img), "-f", "qcow2").start())
    mnt = await export_nbd(exportd, workdir, sock)
    assert (await athread(os.stat, mnt)).st_size == 8 * MiB
    assert await athread(pread, mnt, MiB, 64 * 1024) == b"\x5a" * 65536
    assert await athread(pread, mnt, 0, 4096) == bytes(4096)
    data = pattern(300_000)
    await athread(pwrite, mnt, 2 * MiB + 123, data)  # unaligned, several requests
    assert await athread(pread, mnt, 2 * MiB + 123, len(data)) == data
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "n"})
    peers[0].stop()
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x5a {MiB} 64k", "-c", "read -P 0x33 5M 1M",
                        str(img)], capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in r.stdout
    raw = workdir / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    assert pread(raw, 2 * MiB + 123, len(data)) == data
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)


async def test_nbdkit_memory_many_in_flight(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """Many reads and writes at once through the mount; the server's copy,
    read back by qemu-img, is what was written."""
    peers.append(nbdkit(sock, "memory", "32M").start())
    mnt = await export_nbd(exportd, workdir, sock)
    blobs = {i: pattern(200_000, i) for i in range(12)}

    async def one(i: int) -> None:
        await athread(pwrite, mnt, i * 2 * MiB + i, blobs[i])

    await asyncio.gather(*(one(i) for i in blobs))
    got = await asyncio.gather(*(athread(pread, mnt, i * 2 * MiB + i, len(b)) for i, b in blobs.items()))
    assert got == list(blobs.values())
    out = workdir / "copy.raw"
    await athread(subprocess.run, ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                   f"nbd+unix:///?socket={sock}", str(out)], timeout=60)
    for i, b in blobs.items():
        assert pread(out, i * 2 * MiB + i, len(b)) == b


async def test_nbdkit_file_sparse(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """nbdkit's file plugin: holes of the file are holes of the export
    (SEEK_DATA/SEEK_HOLE on the mount agree with the file), and a
    write-zeroes through fallocate reaches the server."""
    img = workdir / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(pattern(64 * 1024))
        f.seek(8 * MiB)
        f.write(pattern(MiB, 2))
    peers.append(nbdkit(sock, "file", str(img)).start())
    mnt = await export_nbd(exportd, workdir, sock)
    for off in (0, MiB - 1, MiB, MiB + 70_000, 4 * MiB, 8 * MiB, 9 * MiB - 1, 9 * MiB, 16 * MiB - 1):
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            assert await athread(seek, mnt, off, whence) == seek(img, off, whence), (off, whence)
    assert await athread(read_all, mnt) == img.read_bytes()

    def punch(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE: discard/write-zeroes on the node
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            if libc.fallocate(fd, 0x03, 8 * MiB, MiB) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")
        finally:
            os.close(fd)

    await athread(punch, mnt)
    assert await athread(pread, mnt, 8 * MiB, MiB) == bytes(MiB)
    assert pread(img, 8 * MiB, MiB) == bytes(MiB)


async def test_nbdkit_curl_web_image(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """An image on a web server exported as a raw file: nbdkit's curl plugin
    in front of python -m http.server on loopback, read-only all along."""
    need("nbdkit")
    r = subprocess.run(["nbdkit", "curl", "--dump-plugin"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("nbdkit's curl plugin is not installed")
    www = workdir / "www"
    www.mkdir()
    body = pattern(3 * MiB + 512, 7)
    (www / "disk.img").write_bytes(body)
    portfile = workdir / "http.port"
    http = Peer([sys.executable, "-m", "tests.support.range_http", str(www), str(portfile)], str(portfile))
    http.proc = subprocess.Popen(http.argv, stdin=subprocess.DEVNULL, cwd=REPO)
    peers.append(http)
    for _ in range(400):
        if portfile.exists():
            break
        await asyncio.sleep(0.05)
    port = int(portfile.read_text())
    peers.append(nbdkit(sock, "-r", "curl", f"http://127.0.0.1:{port}/disk.img").start())

    # the server says read-only: a writable node is refused, as QEMU does
    err = await exportd.error("blockdev-add", {"driver": "nbd", "node-name": "w", "server": unix(sock)})
    assert err == "Could not open image: Permission denied"  # qemu-storage-daemon 7.2's text
    await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "server": unix(sock),
                                       "auto-read-only": True})
    nodes = await exportd.cmd("query-named-block-nodes")
    (n,) = [x for x in nodes if x["node-name"] == "n"]
    assert n["ro"] is True and n["drv"] == "nbd" and n["file"] == f"nbd+unix://?socket={sock}"
    mnt = workdir / "mnt"
    mnt.touch()
    err = await exportd.error("block-export-add", {"type": "fuse", "id": "w", "node-name": "n",
                                                   "mountpoint": str(mnt), "writable": True})
    assert "read-only" in err
    await exportd.add_export("e", "n", mnt)
    assert await athread(read_all, mnt) == body
    assert await athread(pread, mnt, 3 * MiB, 4096) == body[3 * MiB:]  # the short last piece
    with pytest.raises(OSError) as e:
        await athread(pwrite, mnt, 0, b"x")
    assert e.value.errno == errno.EROFS


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_qsd_nbd_export_under_fuse(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """qemu-storage-daemon 7.2 serves a sparse file over NBD; exportd opens
    it with driver=nbd and exports it through FUSE: reads, writes, and
    SEEK_DATA/SEEK_HOLE on the mount agree with the file underneath."""
    img = workdir / "q.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(2 * MiB)
        f.write(pattern(MiB, 3))
        f.seek(20 * MiB)
        f.write(pattern(128 * 1024, 4))
    assert QSD is not None
    peers.append(Peer([QSD, "--blockdev", f"driver=file,node-name=f,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=x,node-name=f,name=disk,writable=on"], sock).start())
    err = await exportd.error("blockdev-add", {"driver": "nbd", "node-name": "bad", "server": unix(sock),
                                               "export": "nope"})
    assert err.startswith("Requested export not available")
    mnt = await export_nbd(exportd, workdir, sock, export="disk")
    nodes = await exportd.cmd("query-named-block-nodes")
    assert [x["file"] for x in nodes if x["node-name"] == "n"] == [f"nbd+unix:///disk?socket={sock}"]
    offsets = (0, 2 * MiB - 1, 2 * MiB, 3 * MiB - 1, 3 * MiB, 10 * MiB, 20 * MiB + 5, 21 * MiB, 32 * MiB - 1)
    for off in offsets:
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            assert await athread(seek, mnt, off, whence) == seek(img, off, whence), (off, whence)
    assert await athread(seek, mnt, 32 * MiB, os.SEEK_DATA) == "ENXIO"
    data = pattern(MiB + 4097, 5)
    await athread(pwrite, mnt, 12 * MiB + 3, data)
    assert await athread(pread, mnt, 12 * MiB + 3, len(data)) == data
    assert pread(img, 12 * MiB + 3, len(data)) == data  # fsync reached the file through qsd
    assert await athread(read_all, mnt) == img.read_bytes()


async def test_qemu_nbd_over_tcp(peers: list[Peer], exportd: Exportd, workdir: Path) -> None:
    """server.type=inet: qemu-nbd on loopback TCP with an export name."""
    img = workdir / "t.img"
    body = pattern(2 * MiB, 11)
    img.write_bytes(body)
    port = free_port()
    peers.append(Peer([need("qemu-nbd"), "--persistent", "--bind", "127.0.0.1", "--port", str(port),
                       "--export-name", "tcpdisk", "-f", "raw", str(img)], f"127.0.0.1:{port}").start())
    server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
    await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "server": server, "export": "tcpdisk"})
    nodes = await exportd.cmd("query-named-block-nodes")
    assert [x["file"] for x in nodes if x["node-name"] == "n"] == [f"nbd://127.0.0.1:{port}/tcpdisk"]
    mnt = workdir / "mnt"
    mnt.touch()
    await exportd.add_export("e", "n", mnt, writable=True)
    assert await athread(read_all, mnt) == body
    await athread(pwrite, mnt, 5, b"tcp")
    assert img.read_bytes()[:8] == body[:5] + b"tcp"


async def test_exportd_serves_itself(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """exportd's own NBD server and its nbd driver on the same loop: a file
    node served over NBD, opened back as an nbd node and exported through
    FUSE. Data and holes come through both layers."""
    img = workdir / "self.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(pattern(MiB, 12))
    await exportd.blockdev_file("f", img)
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "x", "node-name": "f", "name": "self",
                                           "writable": True})
    mnt = await export_nbd(exportd, workdir, sock, export="self")
    assert await athread(read_all, mnt) == img.read_bytes()
    for off in (0, 3 * MiB - 1, 3 * MiB, 4 * MiB, 8 * MiB - 1):
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            assert await athread(seek, mnt, off, whence) == seek(img, off, whence), (off, whence)
    data = pattern(100_003, 13)
    await athread(pwrite, mnt, 6 * MiB + 1, data)
    assert pread(img, 6 * MiB + 1, len(data)) == data
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "n"})
    await exportd.cmd("nbd-server-stop")
