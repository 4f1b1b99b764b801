"""The nbd driver when things go wrong or are layered: a server that dies
(EIO, no hang), reconnect-delay (requests wait and are re-sent), open-timeout,
qcow2 on top of an nbd node (file child and backing node), and blockdev-add's
errors compared with qemu-storage-daemon 7.2's."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.nbd_client.test_peers import export_nbd, pattern, pread, pwrite, read_all, unix
from tests.support.daemon import Exportd
from tests.support.nbdpeer import Peer, nbdkit, qemu_nbd
from tests.support.qsd import QSD, replies_of, running_qsd
from tests.support.threads import athread

MiB = 1 << 20


def direct_read(path: Path, offset: int, length: int) -> bytes:
    """A read the kernel cannot answer from its page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def sparse_image(path: Path, size: int = 8 * MiB) -> bytes:
    data = pattern(size, 9)
    path.write_bytes(data)
    return data


async def test_server_killed_mid_read_gives_eio(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    img = workdir / "d.img"
    sparse_image(img)
    srv = nbdkit(sock, "--filter=delay", "file", str(img), "rdelay=3").start()
    peers.append(srv)
    mnt = await export_nbd(exportd, workdir, sock)
    reading = asyncio.ensure_future(athread(direct_read, mnt, MiB, 65536))
    await asyncio.sleep(0.5)
    assert not reading.done()
    t0 = time.monotonic()
    srv.kill()
    with pytest.raises(OSError) as e:
        await asyncio.wait_for(reading, 10)
    assert e.value.errno == errno.EIO
    assert time.monotonic() - t0 < 2.5  # the kill, not the server's delay, ended it
    # later requests fail at once too
    with pytest.raises(OSError) as e:
        await athread(direct_read, mnt, 2 * MiB, 4096, timeout=5)
    assert e.value.errno == errno.EIO
    # and the daemon is fine: the export goes away cleanly
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "n"})


async def dd_read(path: Path, offset: int, length: int) -> bytes:
    """An O_DIRECT read by dd, a child process: while it waits on a dead
    server, this process can still fork (a thread of ours blocked in such a
    read would hold fork up: the kernel keeps our address space busy)."""
    proc = await asyncio.create_subprocess_exec(
        "dd", f"if={path}", "iflag=direct,skip_bytes,count_bytes", f"skip={offset}", f"count={length}",
        f"bs={length}", "status=none", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise OSError(errno.EIO, err.decode())
    return out


async def test_reconnect_delay_retries_in_flight(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """With reconnect-delay a request in flight when the server dies is sent
    again once the server is back, and one made meanwhile waits for it."""
    img = workdir / "d.img"
    data = sparse_image(img)
    argv = ("--filter=delay", "file", str(img), "rdelay=1")
    srv = nbdkit(sock, *argv).start()
    peers.append(srv)
    mnt = await export_nbd(exportd, workdir, sock, **{"reconnect-delay": 30})
    in_flight = asyncio.ensure_future(dd_read(mnt, MiB, 65536))
    await asyncio.sleep(0.5)
    srv.kill()
    later = asyncio.ensure_future(dd_read(mnt, 5 * MiB, 4096))
    await asyncio.sleep(1.5)
    assert not in_flight.done() and not later.done()  # waiting, not failed
    t0 = time.monotonic()
    srv2 = nbdkit(sock, *argv)
    peers.append(srv2)
    await athread(srv2.start)
    assert time.monotonic() - t0 < 10
    assert await asyncio.wait_for(in_flight, 20) == data[MiB:MiB + 65536]
    assert await asyncio.wait_for(later, 20) == data[5 * MiB:5 * MiB + 4096]
    await athread(pwrite, mnt, 7 * MiB, b"after")
    assert img.read_bytes()[7 * MiB:7 * MiB + 5] == b"after"


async def test_reconnect_delay_expires(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """Past reconnect-delay a waiting request fails with EIO; a server that
    comes back later is used again."""
    img = workdir / "d.img"
    data = sparse_image(img)
    srv = qemu_nbd(sock, str(img), "-f", "raw").start()
    peers.append(srv)
    mnt = await export_nbd(exportd, workdir, sock, **{"reconnect-delay": 1})
    assert await athread(direct_read, mnt, 0, 4096) == data[:4096]
    srv.kill()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        await athread(direct_read, mnt, MiB, 4096, timeout=10)
    assert e.value.errno == errno.EIO
    assert 0.5 < time.monotonic() - t0 < 5
    srv2 = qemu_nbd(sock, str(img), "-f", "raw")
    peers.append(srv2)
    await athread(srv2.start)
    for _ in range(100):  # the node reconnects in the background
        try:
            assert await athread(direct_read, mnt, MiB, 4096) == data[MiB:MiB + 4096]
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("no reconnect within 10 s")


async def test_open_timeout(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    t0 = time.monotonic()
    err = await exportd.error("blockdev-add", {"driver": "nbd", "node-name": "n", "server": unix(sock),
                                               "open-timeout": 1})
    assert err == f"Failed to connect to '{sock}': No such file or directory"
    assert 0.8 < time.monotonic() - t0 < 5
    srv = nbdkit(sock, "memory", "1M")
    peers.append(srv)

    async def start_later() -> None:
        await asyncio.sleep(1)
        await athread(srv.start)

    starter = asyncio.ensure_future(start_later())
    await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "server": unix(sock),
                                       "open-timeout": 20})
    await starter
    nodes = await exportd.cmd("query-named-block-nodes")
    assert [x["image"]["virtual-size"] for x in nodes if x["node-name"] == "n"] == [MiB]


async def test_silent_server(exportd: Exportd, workdir: Path) -> None:
    """A server that accepts and then says nothing: open-timeout bounds the
    wait, and the monitor answers other commands meanwhile."""
    path = str(workdir / "silent.sock")
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keep it open, say nothing

    server = await asyncio.start_unix_server(accept, path)
    try:
        t0 = time.monotonic()
        adding = asyncio.ensure_future(exportd.error("blockdev-add", {
            "driver": "nbd", "node-name": "n", "server": unix(path), "open-timeout": 2}))
        await asyncio.sleep(0.5)
        assert not adding.done()
        err = await adding
        assert 1.5 < time.monotonic() - t0 < 6
        assert err.startswith(f"Failed to connect to '{path}'")
        assert await exportd.cmd("query-named-block-nodes") == []
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_qcow2_over_nbd(peers: list[Peer], exportd: Exportd, workdir: Path, sock: str) -> None:
    """exportd's qcow2 driver on an nbd `file` child (qemu-nbd serves the
    qcow2 file's bytes raw), and an overlay whose backing node is an nbd
    node; qemu-img checks the image afterwards. An NBD export cannot grow
    (as with QEMU, writes past its end fail), so the image is created with
    its metadata preallocated: new data lands inside the file."""
    img = workdir / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(img), "16M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 3M 1M", str(img)], check=True,
                   capture_output=True)
    srv = qemu_nbd(sock, str(img), "-f", "raw").start()
    peers.append(srv)
    await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "f", "server": unix(sock)})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    mnt = workdir / "mnt"
    mnt.touch()
    await exportd.add_export("e", "q", mnt, writable=True)
    assert await athread(pread, mnt, 3 * MiB, MiB) == b"\x11" * MiB
    data = pattern(2 * MiB + 5, 3)
    await athread(pwrite, mnt, 9 * MiB - 7, data)  # allocates clusters over NBD
    assert await athread(pread, mnt, 9 * MiB - 7, len(data)) == data
    await exportd.del_export("e")
    await exportd.cmd("blockdev-del", {"node-name": "q"})
    await exportd.cmd("blockdev-del", {"node-name": "f"})
    srv.stop()
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
    raw = workdir / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    assert pread(raw, 9 * MiB - 7, len(data)) == data

    # an nbd node as the backing node of a local overlay
    srv2 = qemu_nbd(sock, str(img), "-f", "qcow2", "--read-only")
    peers.append(srv2)
    srv2.start()
    ovl = workdir / "ovl.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ovl), "16M"], check=True)
    await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "b", "server": unix(sock),
                                       "read-only": True})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "o", "backing": "b",
                                       "file": {"driver": "file", "filename": str(ovl)}})
    await exportd.add_export("e2", "o", mnt, writable=True)
    await athread(pwrite, mnt, 3 * MiB, b"top")
    got = await athread(read_all, mnt)
    assert got[3 * MiB:4 * MiB] == b"top" + b"\x11" * (MiB - 3)
    assert got[9 * MiB - 7:9 * MiB - 7 + len(data)] == data


async def test_bad_options(exportd: Exportd, workdir: Path, sock: str) -> None:
    err = await exportd.error("blockdev-add", {"driver": "nbd", "node-name": "n", "server": unix(sock),
                                               "tls-creds": "tls0"})
    assert err == "No TLS credentials with id 'tls0'"  # the object must exist (QEMU's text)
    err = await exportd.error("blockdev-add", {"driver": "nbd", "node-name": "n",
                                               "server": {"type": "vsock", "cid": "3", "port": "1"}})
    assert "vsock" in err


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_errors_as_qemu(peers: list[Peer], tmp_path: Path, workdir: Path) -> None:
    """blockdev-add driver=nbd's replies, exportd against qemu-storage-daemon
    7.2 as the client of the same servers."""
    sock = str(workdir / "s.sock")
    ro_sock = str(workdir / "ro.sock")
    img = workdir / "d.img"
    img.write_bytes(bytes(MiB))
    peers.append(qemu_nbd(sock, str(img), "-f", "raw", "--shared=4", "-x", "disk").start())
    peers.append(nbdkit(ro_sock, "-r", "memory", "1M").start())
    steps = [
        ("blockdev-add", {"driver": "nbd", "node-name": "a", "server": unix(str(workdir / "missing"))}),
        ("blockdev-add", {"driver": "nbd", "node-name": "b", "server": unix(sock), "export": "nope"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": unix(ro_sock)}),
        ("blockdev-add", {"driver": "nbd", "node-name": "d", "server": unix(ro_sock), "read-only": True}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e", "server": unix(sock), "export": "disk",
                          "reconnect-delay": 2, "open-timeout": 1}),
        ("blockdev-add", {"driver": "nbd", "node-name": "f", "server": {"type": "unix"}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "g"}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "d"}),
        ("blockdev-del", {"node-name": "e"}),
    ]
    qsock = str(tmp_path / "q.sock")
    async with running_qsd(qsock):
        theirs = await replies_of(qsock, steps)
    d = Exportd(tmp_path)
    try:
        await d.start()
        ours = await replies_of(str(d.sock), steps)
    finally:
        await d.stop()
    assert ours == theirs
