"""The NBD server over TLS, with certificates made by openssl in QEMU's
layout: qemu-img and nbdinfo (GnuTLS) read through it; a client without
TLS, or with a certificate from another CA, gets nothing but the refusal."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import qemu_img_info_tls
from tests.tls.certs import creds_dir, make_pki

SIZE = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("nbdinfo") is None,
                                reason="openssl and nbdinfo are needed")


def nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)


async def test_nbd_over_tls(exportd: Exportd, workdir: Path) -> None:
    pki, other = make_pki(workdir / "pki"), make_pki(workdir / "other", name="Other CA")
    server_dir = creds_dir(workdir / "server", pki, client=False)
    client_dir = creds_dir(workdir / "client", pki, server=False)
    stranger = creds_dir(workdir / "stranger", other, server=False)
    img = workdir / "disk.img"
    img.write_bytes(b"\xab" * SIZE)
    sock = workdir / "nbd.sock"
    await exportd.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(server_dir),
                                     "endpoint": "server"})
    await exportd.cmd("blockdev-add", {"driver": "file", "node-name": "n0", "filename": str(img)})
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                           "tls-creds": "tls0"})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk0"})

    ok = await asyncio.to_thread(qemu_img_info_tls, sock, client_dir)
    assert ok.returncode == 0, ok.stderr
    assert f'"virtual-size": {SIZE}' in ok.stdout
    out = await asyncio.to_thread(nbdinfo, f"nbds+unix:///disk0?socket={sock}&tls-certificates={client_dir}")
    assert out.returncode == 0 and out.stdout.strip() == str(SIZE), out.stderr
    # no TLS: refused before any export is named; a foreign CA: the handshake fails
    plain = await asyncio.to_thread(nbdinfo, f"nbd+unix:///disk0?socket={sock}")
    assert plain.returncode != 0
    refused = await asyncio.to_thread(qemu_img_info_tls, sock, stranger)
    assert refused.returncode != 0
    # and the server still serves, data too (TLS stays on the stream path)
    again = await asyncio.to_thread(qemu_img_info_tls, sock, client_dir)
    assert again.returncode == 0, again.stderr
    await exportd.cmd("block-export-del", {"id": "e0"})
    await exportd.event("BLOCK_EXPORT_DELETED")
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk0",
                                           "writable": True})
    io = await asyncio.to_thread(
        subprocess.run,
        ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
         "--image-opts", f"driver=nbd,server.type=unix,server.path={sock},export=disk0,tls-creds=tls0,"
         "tls-hostname=localhost",
         "-c", "read -P 0xab 0 64k", "-c", "write -P 0x5a 4k 300k", "-c", "read -P 0x5a 4k 300k"],
        capture_output=True, text=True, timeout=60)
    assert io.returncode == 0 and "verification failed" not in io.stdout, io.stdout + io.stderr
    assert "read 307200/307200" in io.stdout
    await exportd.cmd("nbd-server-stop")
