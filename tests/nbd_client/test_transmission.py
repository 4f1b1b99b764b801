"""The client's reply parser (nbd/client_transmission.py) wherever the
stream splits: a relay between a real server and the nbd node passes the
server's bytes on in pieces of 1 to 19 bytes, one write each, so headers,
offsets and data payloads arrive cut at every position; and with the relay
passing whole buffers, large reads whose data is received straight into
the request's buffer. Checked against the image file. In-process: a
BlockGraph on the test's loop."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.nbd_client.test_peers import pattern
from tests.nbd_client.test_wire import open_node
from tests.support.host import Host
from tests.support.nbdpeer import Peer, nbdkit, qemu_nbd

MiB = 1 << 20


class ChoppingRelay:
    """A UNIX socket relay to `upstream`; the server's bytes go on in pieces
    of at most `piece` bytes (0: as received), each in its own write."""

    def __init__(self, path: str, upstream: str, piece: int) -> None:
        self.path, self.upstream, self.piece = path, upstream, piece
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(7)

    async def __aenter__(self) -> ChoppingRelay:
        self.server = await asyncio.start_unix_server(self._client, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        for src, dst, chop in ((reader, up_w, False), (up_r, writer, True)):
            task = asyncio.create_task(self._pump(src, dst, chop))
            self.tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, chop: bool) -> None:
        try:
            while data := await src.read(1 << 20):
                if not chop or not self.piece:
                    dst.write(data)
                    await dst.drain()
                    continue
                view = memoryview(data)
                while view:
                    n = self.rng.randint(1, self.piece)
                    dst.write(bytes(view[:n]))
                    view = view[n:]
                    await dst.drain()
                    await asyncio.sleep(0)  # the client sees this piece on its own
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()


def sparse_image(path: Path) -> bytearray:
    """4 MiB: data, a hole at 1-2 MiB (nbdkit's file plugin sends it as a
    hole chunk), data."""
    data = bytearray(pattern(4 * MiB, 3))
    data[MiB:2 * MiB] = bytes(MiB)
    with path.open("wb") as f:
        f.write(data[:MiB])
        f.seek(2 * MiB)
        f.write(data[2 * MiB:])
    return data


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
async def test_replies_cut_everywhere(peers: list[Peer], graph_host: Host, workdir: Path, sock: str,
                                      server: str) -> None:
    """Structured replies (nbdkit: data and hole chunks) and qemu-nbd's,
    delivered 1-19 bytes at a time: every read and write is right, also with
    several in flight whose replies interleave."""
    img = workdir / "d.img"
    data = sparse_image(img)
    upstream = str(workdir / "up.sock")
    peers.append((nbdkit(upstream, "file", str(img)) if server == "nbdkit"
                  else qemu_nbd(upstream, str(img), "-f", "raw")).start())
    async with ChoppingRelay(sock, upstream, 19), asyncio.timeout(60):  # a parser that loses its place hangs
        n = await open_node(graph_host, sock)
        for off, ln in ((0, 1), (5, 4096), (MiB - 100, 300), (MiB + 7, 9000), (3 * MiB - 1, 70_001)):
            assert bytes(await n.read(off, ln)) == data[off:off + ln], (off, ln)
        reads = [(i * 150_001, 1000 + i * 37) for i in range(16)]
        got = await asyncio.gather(*(n.read(o, ln) for o, ln in reads))
        assert [bytes(g) for g in got] == [data[o:o + ln] for o, ln in reads]
        blob = pattern(5000, 9)
        await asyncio.gather(*(n.write(i * 65536 + 3, blob) for i in range(8)))
        for i in range(8):
            data[i * 65536 + 3:i * 65536 + 3 + len(blob)] = blob
        st = await n.block_status(MiB + 4096, MiB)
        assert st.length > 0
        assert bytes(await n.read(0, 8 * 65536)) == data[:8 * 65536]
        await n.flush()
    assert img.read_bytes() == data


async def test_large_reads_straight_into_their_buffers(peers: list[Peer], graph_host: Host, workdir: Path,
                                                       sock: str) -> None:
    """Reads larger than the receive buffer (several MiB, several in flight,
    some partly holes) arrive whole and in place."""
    img = workdir / "d.img"
    data = sparse_image(img)
    upstream = str(workdir / "up.sock")
    peers.append(nbdkit(upstream, "file", str(img)).start())
    async with ChoppingRelay(sock, upstream, 0), asyncio.timeout(60):
        n = await open_node(graph_host, sock)
        spans = [(0, 4 * MiB), (123, 3 * MiB), (MiB - 1, MiB + 2), (2 * MiB + 5, 2 * MiB - 5)]
        for _ in range(3):
            got = await asyncio.gather(*(n.read(o, ln) for o, ln in spans))
            assert [bytes(g) for g in got] == [bytes(data[o:o + ln]) for o, ln in spans]
