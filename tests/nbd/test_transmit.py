"""The transmission fast path (exportd/nbd/transmit.py), seen from raw
sockets: requests pipelined with the handshake and cut at every size
across segments, WRITE payloads larger than the receive buffer, clients
that vanish mid-payload, many clients at once, the inline path (tmpfs) and
the awaited one (a disk file) alike, simple and structured replies."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exportd.nbd.transmit import RECV_BUFFER
from tests.nbd.tools import run

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 2, 3, 4, 6
SIZE = 16 << 20
BIG = RECV_BUFFER + 12345  # a WRITE payload that never fits the receive buffer


@pytest.fixture(params=["tmpfs", "disk"])
def image_dir(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Path]:
    """tmpfs: READ/WRITE answered inline (map_now never blocks); disk: awaited."""
    if request.param == "disk":
        yield workdir
        return
    d = Path(tempfile.mkdtemp(prefix="exportd-nbd-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def raw_export(nbd, image_dir: Path, name: str = "disk") -> tuple[Path, bytearray]:
    """A raw file export of SIZE random bytes; returns its path and a copy."""
    img = image_dir / f"{name}.raw"
    content = bytearray(random.Random(name).randbytes(SIZE))
    img.write_bytes(content)
    await nbd.d.cmd("blockdev-add", {"driver": "file", "node-name": name, "filename": str(img)})
    await nbd.export(name, name, name=name, writable=True)
    return img, content


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go(name: str, structured: bool) -> bytes:
    """Client flags (FIXED_NEWSTYLE | NO_ZEROES), STRUCTURED_REPLY if asked, GO."""
    out = struct.pack(">I", 3)
    if structured:
        out += option(8)
    n = name.encode()
    return out + option(7, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))


def request(typ: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length)


@dataclass
class Replies:
    """What came back, by cookie: an error (0 for none) and the data read."""
    errors: dict[int, int] = field(default_factory=dict)
    data: dict[int, bytearray] = field(default_factory=dict)


async def read_handshake(reader: asyncio.StreamReader, structured: bool) -> None:
    magic, opt, flags = struct.unpack(">QQH", await reader.readexactly(18))
    assert opt == IHAVEOPT and flags == 3
    for _ in range(2 if structured else 1):  # STRUCTURED_REPLY's ACK, then GO's INFOs and ACK
        while True:
            _, _, rtype, n = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(n)
            if rtype == 1:
                break
            assert rtype == 3, hex(rtype)


async def read_replies(reader: asyncio.StreamReader, reads: dict[int, tuple[int, int]],
                       structured: bool, count: int) -> Replies:
    """`count` replies; `reads` maps a READ's cookie to its (offset, length)."""
    out = Replies()
    done = 0
    while done < count:
        head = await reader.readexactly(16)
        if struct.unpack_from(">I", head)[0] == SIMPLE_MAGIC:
            # simple replies: any request without structured replies; and
            # with them, any but READ and BLOCK_STATUS (proto.md)
            _, err, cookie = struct.unpack(">IIQ", head)
            assert cookie not in out.errors and not (structured and cookie in reads)
            out.errors[cookie] = err
            if cookie in reads and not err:
                out.data[cookie] = bytearray(await reader.readexactly(reads[cookie][1]))
            done += 1
            continue
        assert structured
        magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", head + await reader.readexactly(4))
        assert magic == STRUCTURED_MAGIC
        payload = await reader.readexactly(n)
        if cookie in reads:
            start, length = reads[cookie]
            buf = out.data.setdefault(cookie, bytearray(b"\xee" * length))
            if rtype == 1:  # OFFSET_DATA
                (off,) = struct.unpack_from(">Q", payload)
                buf[off - start: off - start + n - 8] = payload[8:]
            elif rtype == 2:  # OFFSET_HOLE
                off, hole = struct.unpack(">QI", payload)
                buf[off - start: off - start + hole] = bytes(hole)
        if rtype & 0x8000:
            out.errors[cookie] = struct.unpack_from(">I", payload)[0]
        if flags & 1:  # DONE
            out.errors.setdefault(cookie, 0)
            done += 1
    return out


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    """Cut `data` at sizes that split headers and payloads alike, with a
    pause after each piece so the server sees them one by one."""
    sizes = [1, 3, 27, 29, 512, 4095, 4125, 70001]
    pos = 0
    while pos < len(data):
        n = rng.choice(sizes)
        writer.write(data[pos:pos + n])
        await writer.drain()
        pos += n
        await asyncio.sleep(0.0005 if n < 4096 else 0.002)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
async def test_pipelined_burst_split_across_segments(nbd, image_dir: Path, structured: bool) -> None:
    img, model = await raw_export(nbd, image_dir)
    rng = random.Random(13)
    burst = bytearray(go("disk", structured))  # requests follow GO before its reply
    reads: dict[int, tuple[int, int]] = {}
    expected_errors: dict[int, int] = {}
    cookie = 0
    # writes of every size class (inline, in the receive buffer, own buffer),
    # in the first half; reads of the second half (not written here: the
    # protocol does not order concurrent requests)
    for length in (1, 512, 4096, 65536, 131071, 300000, RECV_BUFFER // 2, 1 << 20, BIG, 4096):
        cookie += 1
        offset = rng.randrange(0, SIZE // 2 - length)
        data = rng.randbytes(length)
        burst += request(WRITE, cookie, offset, length) + data
        model[offset:offset + length] = data
        cookie += 1
        roff, rlen = rng.randrange(SIZE // 2, SIZE - 300000), rng.choice((1, 4096, 65536, 200000))
        burst += request(READ, cookie, roff, rlen)
        reads[cookie] = (roff, rlen)
    cookie += 1
    burst += request(WRITE_ZEROES, cookie, SIZE // 2 - 8192, 8192)
    model[SIZE // 2 - 8192:SIZE // 2] = bytes(8192)
    cookie += 1
    burst += request(FLUSH, cookie, 0, 0)
    cookie += 1
    burst += request(READ, cookie, SIZE - 4096, 8192)  # past the end: EINVAL
    expected_errors[cookie] = 22
    cookie += 1
    burst += request(WRITE, cookie, SIZE - 2, 4) + b"abcd"  # past the end, payload skipped
    expected_errors[cookie] = 22
    cookie += 1
    burst += request(WRITE, cookie, 0, 4, flags=1) + b"FUA!"  # FUA: the awaited path
    model[0:4] = b"FUA!"
    burst += request(DISC, 0, 0, 0)

    reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
    sender = asyncio.create_task(send_in_pieces(writer, bytes(burst), rng))
    await read_handshake(reader, structured)
    got = await read_replies(reader, reads, structured, cookie)
    await sender
    assert await reader.read() == b""  # DISC: everything answered, then closed
    writer.close()
    assert set(got.errors) == set(range(1, cookie + 1))
    assert {c: e for c, e in got.errors.items() if e} == expected_errors
    for c, (off, ln) in reads.items():
        assert got.data[c] == model[off:off + ln], f"read {c} at {off}+{ln}"
    await nbd.d.cmd("block-export-del", {"id": "disk"})
    await nbd.d.event("BLOCK_EXPORT_DELETED")
    assert img.read_bytes() == model


async def test_stream_of_writes_through_the_buffer(nbd, image_dir: Path) -> None:
    """Writes back to back, more than the receive buffer holds several
    times over, at sizes that leave a request cut at its end (moved to the
    front) again and again."""
    img, model = await raw_export(nbd, image_dir)
    rng = random.Random(7)
    stream = bytearray(go("disk", False))
    count = 48
    for cookie in range(1, count + 1):
        length = rng.choice((200001, 4097, 65535, RECV_BUFFER // 3))
        offset = rng.randrange(0, SIZE - length)
        data = rng.randbytes(length)
        stream += request(WRITE, cookie, offset, length) + data
        model[offset:offset + length] = data
    stream += request(DISC, 0, 0, 0)
    reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
    writer.write(bytes(stream))
    await read_handshake(reader, False)
    got = await read_replies(reader, {}, False, count)
    assert got.errors == {c: 0 for c in range(1, count + 1)}
    assert await reader.read() == b""
    writer.close()
    await nbd.d.cmd("block-export-del", {"id": "disk"})
    await nbd.d.event("BLOCK_EXPORT_DELETED")
    assert img.read_bytes() == model


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
async def test_replies_wait_for_a_slow_reader(nbd, image_dir: Path, structured: bool) -> None:
    """Big READ replies that the socket cannot take (sent by sendfile on
    tmpfs, cut where the socket filled up, the rest queued) arrive whole and
    in one piece each, while other clients are served."""
    img, model = await raw_export(nbd, image_dir)
    fds = Path(f"/proc/{nbd.d.proc.pid}/fd")
    fds_before = len(list(fds.iterdir()))
    rng = random.Random(5)
    reads = {}
    burst = bytearray(go("disk", structured))
    for cookie in range(1, 41):
        length = rng.choice((1 << 20, 65536, 4096, 300001))
        offset = rng.randrange(0, SIZE - length)
        reads[cookie] = (offset, length)
        burst += request(READ, cookie, offset, length, flags=4 if structured else 0)  # DF
    reader, writer = await asyncio.open_unix_connection(str(nbd.sock), limit=64)
    writer.write(bytes(burst))
    await writer.drain()
    await asyncio.sleep(0.5)  # nothing read: the server's socket fills up
    out = (await run("qemu-io", "-f", "raw", "-c", "read 0 1M", nbd.uri("disk"), timeout=20)).stdout
    assert "read 1048576/1048576" in out
    await read_handshake(reader, structured)
    got = await read_replies(reader, reads, structured, len(reads))
    assert got.errors == {c: 0 for c in reads}
    for c, (off, ln) in reads.items():
        assert got.data[c] == model[off:off + ln], f"read {c} at {off}+{ln}"
    writer.close()
    # and one that leaves with its replies unread
    reader, writer = await asyncio.open_unix_connection(str(nbd.sock), limit=64)
    writer.write(bytes(burst))
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    assert await clients_of(nbd, 0) == 0
    assert len(list(fds.iterdir())) <= fds_before  # queued replies hold no descriptor
    assert img.read_bytes() == model


async def clients_of(nbd, want: int) -> int:
    n = -1
    for _ in range(100):
        n = (await nbd.d.cmd("query-block-exports"))[0]["clients"]
        if n == want:
            break
        await asyncio.sleep(0.05)
    return n


async def test_disconnect_mid_payload(nbd, image_dir: Path) -> None:
    img, model = await raw_export(nbd, image_dir)
    fds = Path(f"/proc/{nbd.d.proc.pid}/fd")
    fds_before = len(list(fds.iterdir()))
    # cut inside a payload larger than the receive buffer, inside one that
    # fits it, and inside a request header
    for cut in (request(WRITE, 1, 0, BIG) + b"x" * 300000,
                request(WRITE, 1, 0, 8192) + b"y" * 100,
                request(READ, 1, 0, 4096)[:13]):
        reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
        writer.write(go("disk", False))
        await read_handshake(reader, False)
        writer.write(cut)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
    assert await clients_of(nbd, 0) == 0  # nothing leaked
    assert len(list(fds.iterdir())) <= fds_before  # the sockets too
    out = (await run("qemu-io", "-f", "raw", "-c", "read -P 0 0 0", "-c", "write -P 7 0 4k",
                     "-c", "read -P 7 0 4k", nbd.uri("disk"))).stdout
    assert "verification failed" not in out and "read 4096/4096" in out
    await nbd.d.cmd("block-export-del", {"id": "disk"})  # safe: no reference left
    assert await nbd.d.event("BLOCK_EXPORT_DELETED") == {"id": "disk"}
    model[0:4096] = b"\x07" * 4096
    assert img.read_bytes() == model  # the cut writes wrote nothing


async def test_many_clients_at_once(nbd, image_dir: Path) -> None:
    img, model = await raw_export(nbd, image_dir)
    fds = Path(f"/proc/{nbd.d.proc.pid}/fd")
    fds_before = len(list(fds.iterdir()))
    clients = 24
    region = SIZE // clients // 4096 * 4096

    async def client(i: int) -> bytes:
        rng = random.Random(i)
        reader, writer = await asyncio.open_unix_connection(str(nbd.sock))
        writer.write(go("disk", i % 2 == 1))
        await read_handshake(reader, i % 2 == 1)
        base = i * region
        small, big = rng.randbytes(4096), rng.randbytes(300000)
        writer.write(request(WRITE, 1, base, 4096) + small
                     + request(WRITE, 2, base + 8192, len(big)) + big)
        got = await read_replies(reader, {}, i % 2 == 1, 2)
        assert got.errors == {1: 0, 2: 0}
        writer.write(request(READ, 3, base, 8192 + len(big)) + request(DISC, 0, 0, 0))
        got = await read_replies(reader, {3: (base, 8192 + len(big))}, i % 2 == 1, 1)
        assert got.errors == {3: 0}
        assert await reader.read() == b""
        writer.close()
        expect = small + bytes(model[base + 4096:base + 8192]) + big
        assert bytes(got.data[3]) == expect
        return expect

    results = await asyncio.gather(*(client(i) for i in range(clients)))
    for i, expect in enumerate(results):
        model[i * region:i * region + len(expect)] = expect
    assert await clients_of(nbd, 0) == 0
    assert len(list(fds.iterdir())) <= fds_before  # every client's socket closed
    await nbd.d.cmd("block-export-del", {"id": "disk"})
    await nbd.d.event("BLOCK_EXPORT_DELETED")
    assert img.read_bytes() == model


async def test_tcp_client_is_served(nbd, image_dir: Path) -> None:
    """The fast path over TCP too (the socket handed over is an inet one)."""
    await nbd.d.cmd("nbd-server-stop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await nbd.d.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                           "port": str(port)}}})
    img, model = await raw_export(nbd, image_dir)
    out = (await run("qemu-io", "-f", "raw", "-c", "write -P 5 64k 1M", "-c", "read -P 5 64k 1M",
                     f"nbd://127.0.0.1:{port}/disk")).stdout
    assert "verification failed" not in out and "read 1048576/1048576" in out
    model[65536:65536 + (1 << 20)] = b"\x05" * (1 << 20)
    await nbd.d.cmd("block-export-del", {"id": "disk"})
    await nbd.d.event("BLOCK_EXPORT_DELETED")
    assert img.read_bytes() == model
