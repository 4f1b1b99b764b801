"""NBD_OPT_EXTENDED_HEADERS, from the layouts in the extension's text
(NetworkBlockDevice/nbd, branch extension-ext-header, doc/proto.md), on a
raw socket: 32-byte requests with 64-bit lengths and PAYLOAD_LEN, 32-byte
replies carrying the request's offset (never a simple reply),
BLOCK_STATUS_EXT, an effect length past 4 GiB, and the option rules.

The struct layouts are written out here, not taken from exportd.nbd.protocol,
so that a mistake there does not agree with itself. Bookworm's peers
(libnbd 1.14, QEMU 7.2) predate the extension; with libnbd 1.18 or later
built (tests/peers/build_libnbd.sh, EXPORTD_NEW_LIBNBD=its prefix), the last
test runs nbdinfo and python3-libnbd against the export as well."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.nbd.tools import run
from tests.tls.certs import creds_dir, make_pki

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
EXT_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXT_REPLY_MAGIC = 0x6E8A278C
OPT_STARTTLS, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 5, 7, 8, 10, 11
REP_ACK, REP_META_CONTEXT = 1, 4
REP_ERR_INVALID, REP_ERR_EXT_HEADER_REQD = (1 << 31) | 3, (1 << 31) | 10
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 7
FLAG_REQ_ONE, FLAG_PAYLOAD_LEN = 1 << 3, 1 << 5
DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_BLOCK_STATUS_EXT, TYPE_ERROR = 0, 1, 6, (1 << 15) | 1
GIB = 1 << 30


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.cookie = 0

    @classmethod
    async def connect(cls, sock: Path, tls: ssl.SSLContext | None = None) -> Client:
        r, w = await asyncio.open_unix_connection(str(sock))
        magic, opt, _ = struct.unpack(">QQH", await r.readexactly(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        w.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        c = cls(r, w)
        if tls is not None:
            assert (await c.option(OPT_STARTTLS))[-1][0] == REP_ACK
            await w.start_tls(tls, server_hostname="localhost")
        return c

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.w.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", await self.r.readexactly(20))
            assert (magic, ropt) == (OPT_REPLY_MAGIC, opt)
            replies.append((rtype, await self.r.readexactly(length)))
            if rtype == REP_ACK or rtype & (1 << 31):
                return replies

    async def go(self, name: bytes) -> None:
        replies = await self.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] == REP_ACK, replies

    def send(self, typ: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> int:
        self.cookie += 1
        self.w.write(EXT_REQUEST.pack(EXT_REQUEST_MAGIC, flags, typ, self.cookie, offset, length) + payload)
        return self.cookie

    async def chunk(self) -> tuple[int, int, int, int, bytes]:
        """(flags, type, cookie, offset, payload) of the next reply chunk."""
        magic, flags, typ, cookie, offset, length = EXT_REPLY.unpack(await self.r.readexactly(32))
        assert magic == EXT_REPLY_MAGIC, hex(magic)
        return flags, typ, cookie, offset, await self.r.readexactly(length)

    async def reply(self, cookie: int) -> list[tuple[int, int, int, bytes]]:
        chunks = []
        while True:
            flags, typ, got, offset, payload = await self.chunk()
            assert got == cookie
            chunks.append((flags, typ, offset, payload))
            if flags & DONE:
                return chunks

    async def close(self) -> None:
        self.send(CMD_DISC, 0, 0)
        self.w.close()


@pytest.fixture
async def big_export(nbd, workdir: Path) -> Any:
    """A writable 6 GiB sparse raw file (tmpfs or not: only its first
    MiB and its holes are touched)."""
    img = workdir / "big.raw"
    with open(img, "wb") as f:
        f.truncate(6 * GIB)
        f.write(b"\x5a" * (1 << 20))
    await nbd.d.cmd("blockdev-add", {"driver": "file", "node-name": "big", "filename": str(img)})
    await nbd.export("big", "big", name="big", writable=True)
    return nbd


async def _with_tls(nbd: Any, workdir: Path) -> ssl.SSLContext:
    """Restart the NBD server with TLS (TLS connections stay on the stream
    path, the others take nbd/transmit.py's: both must speak the extension)."""
    pki = make_pki(workdir / "pki")
    server_dir = creds_dir(workdir / "server", pki, client=False)
    client_dir = creds_dir(workdir / "client", pki, server=False)
    await nbd.d.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(server_dir),
                                   "endpoint": "server"})
    await nbd.d.cmd("nbd-server-stop")
    await nbd.d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd.sock)}},
                                         "tls-creds": "tls0"})
    await nbd.export("big", "big", name="big", writable=True)
    ctx = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    ctx.load_cert_chain(str(client_dir / "client-cert.pem"), str(client_dir / "client-key.pem"))
    return ctx


@pytest.mark.parametrize("path", ["plain", "tls"])
async def test_extended_transmission(big_export, workdir: Path, path: str) -> None:
    tls = await _with_tls(big_export, workdir) if path == "tls" else None
    c = await Client.connect(big_export.sock, tls)
    try:
        assert (await c.option(OPT_EXTENDED_HEADERS))[-1][0] == REP_ACK
        # extended headers take precedence over structured replies
        assert (await c.option(OPT_STRUCTURED_REPLY))[-1][0] == REP_ERR_EXT_HEADER_REQD
        assert (await c.option(OPT_EXTENDED_HEADERS))[-1][0] == REP_ERR_INVALID  # once
        assert (await c.option(OPT_EXTENDED_HEADERS, b"x"))[-1][0] == REP_ERR_INVALID
        query = b"base:allocation"
        meta = await c.option(OPT_SET_META_CONTEXT, struct.pack(">I", 3) + b"big" + struct.pack(">II", 1, len(query))
                              + query)
        assert meta[0][0] == REP_META_CONTEXT and meta[-1][0] == REP_ACK
        (context_id,) = struct.unpack(">I", meta[0][1][:4])
        await c.go(b"big")

        # WRITE: PAYLOAD_LEN and the payload's length; the reply is a NONE
        # chunk (no simple replies) that repeats the offset
        cookie = c.send(CMD_WRITE, 8192, 4096, FLAG_PAYLOAD_LEN, b"\x11" * 4096)
        assert await c.reply(cookie) == [(DONE, TYPE_NONE, 8192, b"")]
        cookie = c.send(CMD_READ, 4096, 8192)
        [(flags, typ, offset, payload)] = await c.reply(cookie)
        assert (flags, typ, offset) == (DONE, TYPE_OFFSET_DATA, 4096)
        assert payload == struct.pack(">Q", 4096) + b"\x5a" * 4096 + b"\x11" * 4096

        # an effect length past 32 bits: trim 5 GiB in one request
        cookie = c.send(CMD_TRIM, GIB, 5 * GIB)
        assert await c.reply(cookie) == [(DONE, TYPE_NONE, GIB, b"")]
        cookie = c.send(CMD_FLUSH, 0, 0)
        assert await c.reply(cookie) == [(DONE, TYPE_NONE, 0, b"")]

        # BLOCK_STATUS over 6 GiB: one BLOCK_STATUS_EXT chunk, 64-bit descriptors
        cookie = c.send(CMD_BLOCK_STATUS, 0, 6 * GIB)
        [(flags, typ, offset, payload)] = await c.reply(cookie)
        assert (flags, typ, offset) == (DONE, TYPE_BLOCK_STATUS_EXT, 0)
        cid, count = struct.unpack(">II", payload[:8])
        assert cid == context_id and len(payload) == 8 + 16 * count
        extents = [struct.unpack(">QQ", payload[8 + 16 * i: 24 + 16 * i]) for i in range(count)]
        assert extents[0] == (1 << 20, 0)  # data, then holes (hole|zero) to the end
        assert all(status == 3 for _, status in extents[1:])
        assert sum(n for n, _ in extents) == 6 * GIB
        # REQ_ONE over a hole longer than 32 bits: exactly one descriptor
        cookie = c.send(CMD_BLOCK_STATUS, GIB, 5 * GIB, FLAG_REQ_ONE)
        [(flags, typ, offset, payload)] = await c.reply(cookie)
        assert (typ, struct.unpack(">II", payload[:8])) == (TYPE_BLOCK_STATUS_EXT, (context_id, 1))
        length, status = struct.unpack(">QQ", payload[8:24])
        assert 0 < length <= 5 * GIB and status == 3

        # errors are ERROR chunks; a payload nobody expects is read and refused
        cookie = c.send(CMD_READ, 6 * GIB - 512, 4096)
        [(flags, typ, offset, payload)] = await c.reply(cookie)
        assert (flags, typ, offset) == (DONE, TYPE_ERROR, 6 * GIB - 512)
        assert struct.unpack(">I", payload[:4]) == (22,)  # EINVAL
        cookie = c.send(CMD_FLUSH, 0, 16, FLAG_PAYLOAD_LEN, b"\x00" * 16)
        assert (await c.reply(cookie))[0][1] == TYPE_ERROR
        cookie = c.send(CMD_WRITE, 0, 4096)  # a WRITE that does not say its payload
        assert (await c.reply(cookie))[0][1] == TYPE_ERROR
        cookie = c.send(CMD_TRIM, 0, 3 << 20, FLAG_PAYLOAD_LEN, b"\x01" * (3 << 20))  # bigger than a buffer
        assert (await c.reply(cookie))[0][1] == TYPE_ERROR
        cookie = c.send(CMD_READ, 8192, 4096)  # the stream is still in step
        assert (await c.reply(cookie))[0][3] == struct.pack(">Q", 8192) + b"\x11" * 4096
        # a 1 MiB write, received in a buffer of its own on the fast path
        cookie = c.send(CMD_WRITE, 1 << 20, 1 << 20, FLAG_PAYLOAD_LEN, b"\x33" * (1 << 20))
        assert await c.reply(cookie) == [(DONE, TYPE_NONE, 1 << 20, b"")]
        cookie = c.send(CMD_READ, (2 << 20) - 4, 8)
        assert (await c.reply(cookie))[0][3] == struct.pack(">Q", (2 << 20) - 4) + b"\x33" * 4 + bytes(4)
    finally:
        await c.close()


async def test_compact_request_after_extended_drops_the_client(big_export) -> None:
    c = await Client.connect(big_export.sock)
    await c.option(OPT_EXTENDED_HEADERS)
    await c.go(b"big")
    # a compact header, padded to the extended size the server now reads
    c.w.write(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, 512) + bytes(4))
    assert await asyncio.wait_for(c.r.read(), 15) == b""  # a protocol error: hard disconnect
    c.w.close()
    # the server goes on serving others, in either mode
    other = await Client.connect(big_export.sock)
    await other.option(OPT_EXTENDED_HEADERS)
    await other.go(b"big")
    cookie = other.send(CMD_READ, 0, 512)
    assert (await other.reply(cookie))[0][3][8:] == b"\x5a" * 512
    await other.close()


NEW_LIBNBD = os.environ.get("EXPORTD_NEW_LIBNBD", "")


@pytest.mark.skipif(not NEW_LIBNBD, reason="no libnbd >= 1.18 built (EXPORTD_NEW_LIBNBD, tests/peers/build_libnbd.sh)")
async def test_new_libnbd_negotiates_extended_headers(big_export, workdir: Path) -> None:
    prefix = Path(NEW_LIBNBD)
    env = {"LD_LIBRARY_PATH": str(prefix / "lib"),
           "PYTHONPATH": str(prefix / "python")}
    uri = big_export.uri("big")
    script = f"""
import json, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri({uri!r})
h.pwrite(b"\\x22" * 65536, 1 << 20)
ext = []
h.block_status_64(6 << 30, 0, lambda ctx, off, entries, err: ext.extend(list(e) for e in entries) or 0)
h.trim(5 << 30, 1 << 30)
print(json.dumps([h.get_extended_headers_negotiated(), h.pread(8, (1 << 20) + 65532).hex(), ext[:2],
                  sum(n for n, _ in ext)]))
h.shutdown()
"""
    r = await run("env", *(f"{k}={v}" for k, v in env.items()), "/usr/bin/python3", "-c", script)
    negotiated, data, first, total = json.loads(r.stdout.strip().splitlines()[-1])
    assert negotiated is True
    assert data == (b"\x22" * 4 + bytes(4)).hex()
    assert first[0] == [(1 << 20) + 65536, 0] and first[1][1] == 3  # data, then hole|zero
    assert total == 6 * GIB
    info = json.loads((await run("env", *(f"{k}={v}" for k, v in env.items()), str(prefix / "bin" / "nbdinfo"),
                                 "--json", uri)).stdout)
    assert info["exports"][0]["export-size"] == 6 * GIB
