"""The QMP side: nbd-server-start/stop, block-export-add type=nbd, the
deprecated nbd-server-add/remove, compared with qemu-storage-daemon 7.2;
export life cycle with clients connected; max-connections and
handshake-max-seconds; the --nbd-server option."""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

import pytest

from tests.nbd.tools import nbdsh, qemu_img_create, run
from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of_both

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")


async def test_errors_match_qemu_storage_daemon(exportd, workdir: Path) -> None:
    img = workdir / "a.qcow2"
    sock = str(workdir / "n.sock")
    start = {"addr": {"type": "unix", "data": {"path": sock}}}
    node = {"driver": "qcow2", "node-name": "a", "read-only": True,
            "file": {"driver": "file", "filename": str(img)}}
    steps = [
        ("nbd-server-stop", {}),
        ("blockdev-add", node),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "a"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexistent-dir/n.sock"}}}),
        ("nbd-server-start", {**start, "tls-authz": "authz0"}),  # accepted, unused, as 7.2 does
        ("nbd-server-start", start),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "a", "name": "n"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "a", "name": "n"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "a", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "nope"}),
        ("nbd-server-add", {"device": "a", "name": "n2"}),
        ("nbd-server-remove", {"name": "nope"}),
        ("nbd-server-remove", {"name": "n2"}),
        ("block-export-del", {"id": "e0"}),
        ("nbd-server-stop", {}),
        ("nbd-server-stop", {}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}}),
    ]
    ours, theirs = await replies_of_both(workdir, lambda: qemu_img_create(img, "1M"), steps,
                                         lambda: str(exportd.sock))
    assert ours == theirs
    assert ours[4] == {"return": {}} and ours[5] == {"error": ["GenericError", "NBD server already running"]}


async def test_unknown_tls_creds_refused(exportd, workdir: Path) -> None:
    """tls-creds must name a tls-creds-x509 object (QEMU's text); nothing is started."""
    desc = await exportd.error("nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": str(workdir / "t.sock")}}, "tls-creds": "tls0"})
    assert desc == "No TLS credentials with id 'tls0'"
    assert not (workdir / "t.sock").exists()
    assert await exportd.error("nbd-server-stop") == "NBD server not running"


async def test_differential_nbdinfo_and_qemu_io(exportd, workdir: Path) -> None:
    """Same image, same clients: exportd's answers are qemu-storage-daemon's."""
    from tests.nbd.tools import chain_images, nbdinfo_json
    from tests.support.qsd import replies_of, running_qsd

    sock = workdir / "n.sock"
    steps = [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": str(workdir / "top.qcow2")}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "disk",
                              "description": "d", "allocation-depth": True, "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "top", "name": "ro"}),
    ]
    uri = f"nbd+unix:///disk?socket={sock}"
    io = ["-c", "read -P 0xaa 0 1M", "-c", "read -P 0 1M 1M", "-c", "read -P 0x22 4M 512k",
          "-c", "write -P 0x33 9M 4k", "-c", "write -z 2M 64k", "-c", "discard 4M 64k", "-c", "flush"]

    async def observe() -> list[object]:
        seen: list[object] = [await nbdinfo_json(uri), await nbdinfo_json(f"nbd+unix:///ro?socket={sock}")]
        for m in ("--map", "--map=qemu:allocation-depth"):
            seen.append((await run("nbdinfo", m, uri)).stdout)
        seen.append((await run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}")).stdout)
        out = (await run("qemu-io", "-f", "raw", *io, uri)).stdout
        seen.append([line for line in out.splitlines() if "bytes at" in line or "fail" in line])
        seen.append((await run("nbdinfo", "--map", uri)).stdout)
        return seen

    chain_images(workdir)
    async with running_qsd(str(workdir / "qsd.sock")):
        await replies_of(str(workdir / "qsd.sock"), steps)
        theirs = await observe()
    chain_images(workdir)
    await replies_of(str(exportd.sock), steps)
    ours = await observe()
    assert ours == theirs


async def test_safe_delete_while_connected_and_hard_delete(nbd, workdir: Path) -> None:
    img = workdir / "c.qcow2"
    qemu_img_create(img, "1M")
    await nbd.qcow2("c", img)
    await nbd.export("c", "c")
    reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 1) + b"c")
    size, flags = struct.unpack(">QH", await reader.readexactly(10))  # EXPORT_NAME, NO_ZEROES
    assert size == 1 << 20 and flags & 2  # READ_ONLY
    assert await nbd.d.error("block-export-del", {"id": "c"}) == "export 'c' still in use"
    await nbd.d.cmd("block-export-del", {"id": "c", "mode": "hard"})
    assert await nbd.d.event("BLOCK_EXPORT_DELETED") == {"id": "c"}
    assert await reader.read() == b""  # dropped
    writer.close()


async def test_safe_delete_right_after_a_client_hung_up(nbd, workdir: Path) -> None:
    # a client that sent DISC and closed is no user, even if the loop has not
    # yet processed its end when block-export-del arrives (which one comes
    # first is up to the loop: hence several rounds)
    img = workdir / "c.qcow2"
    qemu_img_create(img, "1M")
    await nbd.qcow2("c", img)
    for _ in range(20):
        await nbd.export("c", "c")
        reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 1) + b"c")
        await reader.readexactly(10)
        writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 1, 0, 0))  # NBD_CMD_DISC
        writer.close()
        await writer.wait_closed()
        await nbd.d.cmd("block-export-del", {"id": "c"})
        assert await nbd.d.event("BLOCK_EXPORT_DELETED") == {"id": "c"}


async def test_max_connections_and_handshake_timeout(exportd, workdir: Path) -> None:
    sock = workdir / "n.sock"
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                           "max-connections": 2, "handshake-max-seconds": 1})
    img = workdir / "m.qcow2"
    qemu_img_create(img, "1M")
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "m",
                                       "file": {"driver": "file", "filename": str(img)}})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "m", "node-name": "m"})
    stalled = [await asyncio.open_unix_connection(str(sock)) for _ in range(2)]
    for r, _ in stalled:
        await r.readexactly(18)
    third = await run("nbdinfo", "--size", f"nbd+unix:///m?socket={sock}", check=False)
    assert third.returncode != 0  # over max-connections
    t0 = asyncio.get_running_loop().time()
    for r, w in stalled:  # the stalled handshakes are dropped after 1 s
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
    assert asyncio.get_running_loop().time() - t0 < 5
    assert (await run("nbdinfo", "--size", f"nbd+unix:///m?socket={sock}")).stdout.strip() == str(1 << 20)


async def test_many_clients_at_once(nbd, workdir: Path) -> None:
    img = workdir / "many.qcow2"
    qemu_img_create(img, "64M")
    await nbd.qcow2("many", img)
    await nbd.export("many", "many", writable=True)

    async def client(i: int) -> str:
        off = i << 20
        return (await run("qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {off} 1M",
                          "-c", f"read -P {i + 1} {off} 1M", nbd.uri("many"))).stdout

    outs = await asyncio.gather(*(client(i) for i in range(24)))
    assert all("verification failed" not in o and "read 1048576/1048576" in o for o in outs)
    # concurrency inside one client: 64 reads in flight from libnbd
    result = await nbdsh("""
        cookies = [h.aio_pread(nbd.Buffer(65536), i * 65536) for i in range(64)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        result = sum(1 for c in cookies if h.aio_command_completed(c))
    """, nbd.uri("many"))
    assert result == 64


async def test_nbd_server_command_line_option(workdir: Path) -> None:
    img = workdir / "cl.qcow2"
    qemu_img_create(img, "2M")
    sock = workdir / "cl.sock"
    d = Exportd(workdir)
    try:
        await d.start("--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=4",
                      "--blockdev", f"driver=qcow2,node-name=cl,file.driver=file,file.filename={img}",
                      "--export", "type=nbd,id=cl,node-name=cl,name=x")
        assert (await run("nbdinfo", "--size", f"nbd+unix:///x?socket={sock}")).stdout.strip() == str(2 << 20)
        await d.quit()
        assert not sock.exists()  # the listener's socket file goes at exit
    finally:
        await d.stop()
    assert sys.executable


async def test_quit_with_clients_in_flight(workdir: Path) -> None:
    """quit while clients read: every export goes (one event each), the
    daemon exits 0, the socket file is gone."""
    img = workdir / "q.qcow2"
    qemu_img_create(img, "64M")
    sock = workdir / "q.sock"
    d = Exportd(workdir)
    try:
        await d.start("--nbd-server", f"addr.type=unix,addr.path={sock}",
                      "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}",
                      "--export", "type=nbd,id=q,node-name=q,writable=on")
        readers = [asyncio.create_task(run("qemu-img", "convert", "-f", "raw", "-O", "raw",
                                           f"nbd+unix:///q?socket={sock}", str(workdir / f"o{i}.raw"),
                                           check=False)) for i in range(4)]
        await asyncio.sleep(0.3)
        await d.cmd("quit")
        assert await d.event("BLOCK_EXPORT_DELETED") == {"id": "q"}
        await d.disconnect()
        assert await asyncio.to_thread(d.proc.wait, 20) == 0
        await asyncio.gather(*readers)
        assert not sock.exists()
    finally:
        await d.stop()
