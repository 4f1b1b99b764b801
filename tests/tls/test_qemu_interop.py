"""The credentials layout is QEMU's, and exportd's contexts speak TLS with
QEMU's GnuTLS: qemu-storage-daemon 7.2 serves NBD with --object
tls-creds-x509 on a directory from tests.tls.certs; qemu-img, nbdinfo and
exportd.tls (NBD_OPT_STARTTLS by hand, then NBD_OPT_LIST) connect to it."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exportd.tls import TlsCredsX509, TlsError, upgrade
from tests.support.programs import qemu_img_info_tls
from tests.support.qsd import QSD, running_qsd
from tests.tls.certs import Pki, creds_dir

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_ABORT, OPT_LIST, OPT_STARTTLS = 2, 3, 5
REP_ACK, REP_SERVER = 1, 2
SIZE = 1 << 20


@pytest.fixture
async def qsd_tls(tmp_path: Path, creds: dict[str, Path]) -> AsyncIterator[str]:
    """qemu-storage-daemon exporting `disk0` over NBD on a UNIX socket, TLS required."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\xab" * SIZE)
    sock = str(tmp_path / "nbd.sock")
    async with running_qsd(str(tmp_path / "qsd.sock"),
                           "--object", f"tls-creds-x509,id=tls0,dir={creds['server']},endpoint=server",
                           "--blockdev", f"driver=file,node-name=n0,filename={img}",
                           "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
                           "--export", "type=nbd,id=e0,node-name=n0,name=disk0"):
        for _ in range(200):
            if Path(sock).exists():
                break
            await asyncio.sleep(0.05)
        yield sock


async def test_qemu_img_with_our_layout(qsd_tls: str, creds: dict[str, Path], tmp_path: Path,
                                        pki: Pki, other_pki: Pki) -> None:
    ok = await asyncio.to_thread(qemu_img_info_tls, qsd_tls, creds["client"])
    assert ok.returncode == 0, ok.stderr
    assert f'"virtual-size": {SIZE}' in ok.stdout
    stranger = creds_dir(tmp_path / "stranger", other_pki, server=False)
    refused = await asyncio.to_thread(qemu_img_info_tls, qsd_tls, stranger)
    assert refused.returncode != 0


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo is not installed")
async def test_nbdinfo_with_our_layout(qsd_tls: str, creds: dict[str, Path]) -> None:
    uri = f"nbds+unix:///disk0?socket={qsd_tls}&tls-certificates={creds['client']}"
    out = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--size", uri],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(SIZE)


async def starttls_and_list(sock: str, creds: TlsCredsX509) -> list[str]:
    """The NBD handshake up to STARTTLS, upgrade(), then the export list."""
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        magic, opt, flags = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1
        writer.write(struct.pack(">I", 1 | (flags & 2)))

        async def option(code: int) -> None:
            writer.write(struct.pack(">QII", IHAVEOPT, code, 0))
            await writer.drain()

        async def reply() -> tuple[int, bytes]:
            magic, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
            assert magic == REPLY_MAGIC
            return rtype, await reader.readexactly(length)

        await option(OPT_STARTTLS)
        assert (await reply())[0] == REP_ACK
        await upgrade(writer, creds.client_context("localhost"), server_side=False, server_hostname="localhost")
        await option(OPT_LIST)
        names = []
        while (r := await reply())[0] == REP_SERVER:
            (n,) = struct.unpack(">I", r[1][:4])
            names.append(r[1][4:4 + n].decode())
        assert r[0] == REP_ACK
        await option(OPT_ABORT)
        return names
    finally:
        writer.close()


async def test_our_client_context_with_qemu_server(qsd_tls: str, creds: dict[str, Path], tmp_path: Path,
                                                   pki: Pki, other_pki: Pki) -> None:
    ours = TlsCredsX509(id="c", dir=str(creds["client"]))
    ours.load()
    assert await starttls_and_list(qsd_tls, ours) == ["disk0"]
    # QEMU's server requires a client certificate (verify-peer defaults to on)
    anon_dir = creds_dir(tmp_path / "anon", pki, server=False, client=False)
    anonymous = TlsCredsX509(id="a", dir=str(anon_dir))
    anonymous.load()
    with pytest.raises((TlsError, asyncio.IncompleteReadError, ConnectionError)):
        await starttls_and_list(qsd_tls, anonymous)
    stranger = TlsCredsX509(id="s", dir=str(creds_dir(tmp_path / "stranger", other_pki, server=False)))
    stranger.load()
    with pytest.raises(TlsError, match="^TLS handshake failed: "):
        await starttls_and_list(qsd_tls, stranger)


async def serve_size_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          creds: TlsCredsX509, outcomes: asyncio.Queue[object]) -> None:
    """Just enough of an NBD server for `nbdinfo --size` over TLS: STARTTLS
    with upgrade(), then GO answered with the export's size; every other
    option is unsupported. What happened goes to `outcomes`."""
    try:
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        await reader.readexactly(4)
        while True:
            magic, code, length = struct.unpack(">QII", await reader.readexactly(16))
            assert magic == IHAVEOPT
            await reader.readexactly(length)

            def reply(rtype: int, data: bytes = b"", code: int = code) -> None:
                writer.write(struct.pack(">QIII", REPLY_MAGIC, code, rtype, len(data)) + data)

            if code == OPT_STARTTLS:
                reply(REP_ACK)
                await writer.drain()
                await upgrade(writer, creds.server_context(), server_side=True)
                outcomes.put_nowait("tls")
            elif code == 7 and writer.get_extra_info("ssl_object") is not None:  # NBD_OPT_GO
                reply(3, struct.pack(">HQH", 0, SIZE, 1))  # NBD_REP_INFO: NBD_INFO_EXPORT, has-flags
                reply(REP_ACK)
                await writer.drain()
                await reader.read(28)  # NBD_CMD_DISC
                outcomes.put_nowait("served")
                return
            elif code == OPT_ABORT:
                return
            else:
                reply((1 << 31) + 1)  # NBD_REP_ERR_UNSUP
            await writer.drain()
    except (TlsError, asyncio.IncompleteReadError, ConnectionError) as e:
        outcomes.put_nowait(e)
    finally:
        writer.close()


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo is not installed")
async def test_our_server_context_with_libnbd(creds: dict[str, Path], tmp_path: Path, pki: Pki,
                                              other_pki: Pki) -> None:
    ours = TlsCredsX509(id="s", dir=str(creds["server"]), endpoint="server")
    ours.load()
    outcomes: asyncio.Queue[object] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: serve_size_only(r, w, ours, outcomes), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def nbdinfo(client_dir: Path) -> subprocess.CompletedProcess[str]:
        uri = f"nbds://127.0.0.1:{port}/disk0?tls-certificates={client_dir}"
        return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)

    try:
        out = await asyncio.to_thread(nbdinfo, creds["client"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(SIZE)
        assert [await outcomes.get(), await outcomes.get()] == ["tls", "served"]
        # a GnuTLS client whose certificate our CA did not sign is refused in the handshake
        stranger = creds_dir(tmp_path / "stranger", other_pki, server=False, ca=pki.ca_cert)
        out = await asyncio.to_thread(nbdinfo, stranger)
        assert out.returncode != 0
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert isinstance(outcome, TlsError), outcome
    finally:
        server.close()
        await server.wait_closed()
