"""What the nbd driver puts on the wire, seen by nbdkit's log filter: FUA,
trim, write-zeroes (with and without unmap), flush and block status are
passed through; many requests are in flight at once on the one
connection; a server's block size limits (blocksize-policy filter, which
fails any request outside them) are kept by splitting and read-modify-write.
In-process: a BlockGraph on the test's loop, closed at the end."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.nbd_client.test_peers import pattern
from tests.support.host import Host
from tests.support.nbdpeer import Peer, nbdkit

MiB = 1 << 20


async def open_node(h: Host, sock: str, **opts: object):  # noqa: ANN201
    return await h.graph.add({"driver": "nbd", "node-name": "n", "server": {"type": "unix", "path": sock},
                              "read-only": False, **opts})


async def test_commands_passed_through(peers: list[Peer], graph_host: Host, workdir: Path, sock: str) -> None:
    log = workdir / "nbdkit.log"
    peers.append(nbdkit(sock, "--filter=log", "memory", "16M", f"logfile={log}").start())
    n = await open_node(graph_host, sock)
    await n.write(4096, b"x" * 4096, fua=True)
    await n.write(3 * 4096, b"y" * 4096)
    await n.write_zeroes(0, 65536, may_unmap=True)
    await n.write_zeroes(65536, 65536)
    await n.discard(MiB, MiB)
    await n.flush()
    st = await n.block_status(0, 16 * MiB)
    await graph_host.graph.close_all()
    peers[0].stop()
    text = log.read_text()
    assert "Write id=" in text and re.search(r"Write id=\d+ offset=0x1000 count=0x1000 fua=1", text)
    assert re.search(r"Write id=\d+ offset=0x3000 count=0x1000 fua=0", text)
    assert re.search(r"Zero id=\d+ offset=0x0 count=0x10000 trim=1", text)
    assert re.search(r"Zero id=\d+ offset=0x10000 count=0x10000 trim=0", text)
    assert re.search(r"Trim id=\d+ offset=0x100000 count=0x100000", text)
    assert re.search(r"Flush id=\d+", text)
    assert re.search(r"Extents id=\d+ offset=0x0 count=0x1000000 req_one=1", text)
    assert not st.status & 1 and st.length == 16 * MiB  # all zeroed or trimmed: a hole


async def test_many_in_flight(peers: list[Peer], graph_host: Host, workdir: Path, sock: str) -> None:
    """16 reads of a server that takes 0.5 s per read finish in about 0.5 s,
    not 8 s: they share the connection, each matched to its reply by cookie."""
    import asyncio

    img = workdir / "d.img"
    data = pattern(4 * MiB, 8)
    img.write_bytes(data)
    peers.append(nbdkit(sock, "--filter=delay", "file", str(img), "rdelay=500ms").start())
    n = await open_node(graph_host, sock)
    t0 = time.monotonic()
    got = await asyncio.gather(*(n.read(i * 200_000 + i, 10_000 + i) for i in range(16)))
    took = time.monotonic() - t0
    assert [bytes(g) for g in got] == [data[i * 200_000 + i:i * 200_000 + i + 10_000 + i] for i in range(16)]
    assert took < 4, took


async def test_server_block_size_limits(peers: list[Peer], graph_host: Host, workdir: Path, sock: str) -> None:
    """The server takes only requests aligned to 4 KiB and at most 64 KiB
    long (it fails any other): unaligned and large reads and writes still work."""
    img = workdir / "d.img"
    data = bytearray(pattern(4 * MiB, 6))
    img.write_bytes(data)
    peers.append(nbdkit(sock, "--filter=blocksize-policy", "file", str(img), "blocksize-minimum=4096",
                        "blocksize-preferred=4096", "blocksize-maximum=65536",
                        "blocksize-error-policy=error").start())
    n = await open_node(graph_host, sock)
    assert n.request_alignment == 4096
    assert bytes(await n.read(123, MiB + 5)) == data[123:123 + MiB + 5]
    blob = pattern(300_001, 2)
    await n.write(MiB + 7, blob, fua=True)
    data[MiB + 7:MiB + 7 + len(blob)] = blob
    assert bytes(await n.read(0, 4 * MiB)) == data
    await n.flush()
    assert img.read_bytes() == data
