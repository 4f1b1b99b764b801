"""Sockets given as file descriptors (SocketAddress type `fd`): an
inherited listening socket on the command line (`--nbd-server
addr.type=fd`), compared with qemu-storage-daemon 7.2; and descriptors
passed to the monitor with SCM_RIGHTS and named with `getfd` (QEMU's
system emulator has getfd; qemu-storage-daemon 7.2 does not), with the
real qemu.qmp client's send_fd_scm, for nbd-server-start and for the nbd
driver's connected socket."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nbd.tools import nbdinfo_json, nbdsh, run
from tests.support.nbdpeer import nbdkit
from tests.support.qmp import RawQMP
from tests.support.qsd import QSD, replies_of, running_qsd


def _listening_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _start_on_inherited_fd(who: str, workdir: Path, image: Path, lsock: socket.socket) -> subprocess.Popen:
    fd = lsock.fileno()
    common = ["--blockdev", f"driver=file,node-name=f,filename={image}",
              "--nbd-server", f"addr.type=fd,addr.str={fd}",
              "--export", "type=nbd,id=e,node-name=f,name=disk,writable=on"]
    qmp = str(workdir / f"{who}.qmp")
    if who == "qsd":
        argv = [QSD, "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m", *common]
    else:
        argv = [sys.executable, "-m", "exportd", "--socket", qmp, *common]
    proc = subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"{who}.log", "wb"))  # noqa: SIM115 - the child keeps it
    for _ in range(600):
        if Path(qmp).exists():
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"{who} exited: {(workdir / f'{who}.log').read_text()[-2000:]}")
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{who} made no monitor socket")


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_inherited_listening_socket_on_the_command_line(workdir: Path) -> None:
    """Both daemons serve an export on a listening socket they inherited;
    the same client sees the same export through either."""
    image = workdir / "disk.raw"
    image.write_bytes(b"exportd!" * 8192)
    seen = {}
    for who in ("qsd", "exportd"):
        path = workdir / f"{who}-nbd.sock"
        lsock = _listening_socket(path)
        proc = await _start_on_inherited_fd(who, workdir, image, lsock)
        try:
            lsock.close()  # the daemon's copy is the one that serves
            uri = f"nbd+unix:///disk?socket={path}"
            info = await nbdinfo_json(uri)
            data = await nbdsh("result = h.pread(16, 65520).hex()", uri)
            seen[who] = ([(e["export-name"], e["export-size"], e["is_read_only"]) for e in info["exports"]], data)
        finally:
            proc.terminate()
            proc.wait(15)
    assert seen["exportd"] == seen["qsd"]
    assert seen["exportd"][1] == (b"exportd!" * 2).hex()


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_fd_address_over_qmp_against_qemu_storage_daemon(exportd, workdir: Path) -> None:
    """Over QMP an fd address is a monitor fd name, never a number (QEMU's
    socket_get_fd). qemu-storage-daemon 7.2 has no getfd, and refuses every
    fd address over QMP with its stub's text; exportd has QEMU's getfd, and
    refuses a name nobody gave with the system emulator's text."""
    steps = [
        ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "3"}}}),
        ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "lsn"}}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "n", "server": {"type": "fd", "str": "conn"}}),
        ("nbd-server-stop", {}),
    ]
    async with running_qsd(str(workdir / "qsd.sock")):
        theirs = await replies_of(str(workdir / "qsd.sock"), steps)
    ours = await replies_of(str(exportd.sock), steps)
    stub = {"error": ["GenericError", "only QEMU supports file descriptor passing"]}
    assert theirs == [stub, stub, stub, {"error": ["GenericError", "NBD server not running"]}]
    assert ours == [{"error": ["GenericError", f"File descriptor named '{name}' has not been found"]}
                    for name in ("3", "lsn", "conn")] + theirs[3:]


async def test_getfd_errors_and_no_leak(exportd, workdir: Path) -> None:
    """getfd/closefd with QEMU's texts; a replaced, refused or closed
    descriptor is closed in the daemon (its open fd count comes back)."""
    client = exportd.client
    before = _open_fds(exportd.pid)
    assert await exportd.error("getfd", {"fdname": "x"}) == "No file descriptor supplied via SCM_RIGHTS"
    assert await exportd.error("closefd", {"fdname": "x"}) == "File descriptor named 'x' not found"
    r, w = os.pipe()
    try:
        client.send_fd_scm(r)
        assert await exportd.error("getfd", {"fdname": "1x"}) == \
            "Parameter 'fdname' expects a name not starting with a digit"
        for _ in range(3):  # the same name again: the older descriptor is closed
            client.send_fd_scm(r)
            await exportd.cmd("getfd", {"fdname": "p"})
        assert _open_fds(exportd.pid) == before + 1
        # a pipe is no socket: refused, and the name is used up (QEMU takes it)
        assert await exportd.error("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "p"}}}) == \
            "File descriptor 'p' is not a socket"
        assert await exportd.error("closefd", {"fdname": "p"}) == "File descriptor named 'p' not found"
        client.send_fd_scm(r)
        await exportd.cmd("getfd", {"fdname": "q"})
        await exportd.cmd("closefd", {"fdname": "q"})
        client.send_fd_scm(w)  # sent, never named: closed when the connection ends
    finally:
        os.close(r)
        os.close(w)
    await client.disconnect()
    await client.connect(str(exportd.sock))
    await exportd.cmd("query-version")
    for _ in range(100):  # the old session's end may still be on its way
        if _open_fds(exportd.pid) == before:
            break
        await asyncio.sleep(0.05)
    assert _open_fds(exportd.pid) == before


async def test_pipelined_descriptors_pair_with_their_getfd(exportd, workdir: Path) -> None:
    """fd, getfd, fd, getfd sent without waiting (the kernel hands the second
    descriptor over with the first getfd's bytes): each getfd names the
    descriptor sent before it, as in QEMU, which reads a byte at a time."""
    r, w = os.pipe()
    path = workdir / "second.sock"
    lsock = _listening_socket(path)
    qmp = RawQMP(str(exportd.sock))
    try:
        qmp.negotiate()

        def with_fd(data: bytes, fd: int) -> None:
            qmp.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

        with_fd(b" ", r)
        qmp.send('{"execute": "getfd", "arguments": {"fdname": "first"}}')
        with_fd(b" ", lsock.fileno())
        qmp.send('{"execute": "getfd", "arguments": {"fdname": "second"}}')
        assert [qmp.recv_msg(), qmp.recv_msg()] == [{"return": {}}, {"return": {}}]
        # "second" is the listening socket, "first" the pipe
        assert qmp.cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "second"}}}) == {"return": {}}
        reply = qmp.cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "first"}}})
        assert reply["error"]["desc"] == "NBD server already running"
        assert qmp.cmd("closefd", {"fdname": "first"}) == {"return": {}}
        assert qmp.cmd("nbd-server-stop") == {"return": {}}
    finally:
        qmp.close()
        lsock.close()
        os.close(r)
        os.close(w)


async def test_getfd_listening_socket_for_nbd_server_start(exportd, workdir: Path) -> None:
    """The orchestrator's way (libvirt with QEMU): bind the socket itself,
    pass it with SCM_RIGHTS, name it, start the NBD server on the name.
    Names belong to the monitor: a client may name it and go away."""
    image = workdir / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    path = workdir / "passed.sock"
    lsock = _listening_socket(path)
    try:
        exportd.client.send_fd_scm(lsock.fileno())
        await exportd.cmd("getfd", {"fdname": "lsn"})
    finally:
        lsock.close()
    await exportd.client.disconnect()
    await exportd.client.connect(str(exportd.sock))
    await exportd.cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "lsn"}}})
    # taken by the server: the name is gone
    assert await exportd.error("closefd", {"fdname": "lsn"}) == "File descriptor named 'lsn' not found"
    await exportd.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "name": "disk"})
    out = workdir / "copy.raw"
    await run("nbdcopy", f"nbd+unix:///disk?socket={path}", str(out))
    assert out.read_bytes() == image.read_bytes()
    await exportd.cmd("nbd-server-stop")


async def test_nbd_driver_on_a_passed_connected_socket(exportd, workdir: Path) -> None:
    """blockdev-add driver=nbd with server.type=fd: a socket the client
    connected to nbdkit, passed and named; the node reads nbdkit's data,
    and names the server as QEMU does for an fd (json: filename)."""
    data = os.urandom(1 << 20)
    image = workdir / "src.raw"
    image.write_bytes(data)
    server = nbdkit(str(workdir / "kit.sock"), "file", str(image)).start()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(workdir / "kit.sock"))
        try:
            exportd.client.send_fd_scm(conn.fileno())
            await exportd.cmd("getfd", {"fdname": "kit"})
        finally:
            conn.close()
        await exportd.cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "reconnect-delay": 30,
                                           "server": {"type": "fd", "str": "kit"}})
        nodes = {n["node-name"]: n for n in await exportd.cmd("query-named-block-nodes")}
        assert nodes["n"]["file"] == 'json:{"driver": "nbd", "server": {"type": "fd", "str": "kit"}}'
        nbd_path = workdir / "ours.sock"
        await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_path)}}})
        await exportd.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "name": "disk"})
        out = workdir / "copy.raw"
        await run("nbdcopy", f"nbd+unix:///disk?socket={nbd_path}", str(out))
        assert out.read_bytes() == data
        # the passed socket was the only one: when the server goes, reads
        # fail at once, whatever reconnect-delay says (nothing to reconnect with)
        server.kill()
        start = time.monotonic()
        errnum = await nbdsh("""
            try:
                h.pread(4096, 1 << 19)
                result = 0
            except nbd.Error as e:
                result = e.errnum
        """, f"nbd+unix:///disk?socket={nbd_path}")
        assert errnum == 5 and time.monotonic() - start < 20  # EIO, not a 30 s wait
        await exportd.cmd("block-export-del", {"id": "e"})
        await exportd.cmd("blockdev-del", {"node-name": "n"})
        await exportd.cmd("nbd-server-stop")
    finally:
        server.stop()
