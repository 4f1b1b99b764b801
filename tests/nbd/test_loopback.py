"""Both halves of NBD in exportd: one daemon serves a qcow2 node over NBD
(with TLS), a second opens it with the nbd driver and exports it through
FUSE; writes through that mount land in the first daemon's image, reads
and SEEK_DATA/SEEK_HOLE tell the truth, and qemu-img check stays clean."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.nbd_client.test_peers import pread, pwrite, seek
from tests.support.daemon import Exportd
from tests.support.threads import athread
from tests.tls.certs import creds_dir, make_pki

M = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for the TLS leg")


async def test_exportd_serves_exportd_over_nbd_with_tls(exportd: Exportd, workdir: Path) -> None:
    pki = make_pki(workdir / "pki")
    server_dir = creds_dir(workdir / "server", pki, client=False)
    client_dir = creds_dir(workdir / "client", pki, server=False)
    img = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(8 * M)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 1M", str(img)], check=True,
                   capture_output=True)
    sock = workdir / "nbd.sock"
    await exportd.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(server_dir),
                                     "endpoint": "server"})
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                       "file": {"driver": "file", "filename": str(img)}})
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                           "tls-creds": "tls0"})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "n", "node-name": "disk", "name": "disk",
                                           "writable": True})
    client_home = workdir / "client-daemon"
    client_home.mkdir()
    b = Exportd(client_home)
    await b.start()
    try:
        await b.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(client_dir),
                                   "endpoint": "client"})
        await b.cmd("blockdev-add", {"driver": "nbd", "node-name": "remote", "export": "disk",
                                     "server": {"type": "unix", "path": str(sock)}, "tls-creds": "tls0",
                                     "tls-hostname": "localhost"})
        mnt = client_home / "remote.raw"
        mnt.touch()
        await b.add_export("f", "remote", mnt, writable=True)
        assert (await athread(os.stat, mnt)).st_size == 8 * M
        await athread(pwrite, mnt, 4 * M, b"z" * 65536)
        assert await athread(pread, mnt, 4 * M, 65536) == b"z" * 65536
        assert await athread(seek, mnt, 0, os.SEEK_DATA) == M  # the hole before 1 MiB is a hole
        assert await athread(seek, mnt, M, os.SEEK_HOLE) == 2 * M
        await b.del_export("f")
        await b.cmd("blockdev-del", {"node-name": "remote"})
    finally:
        await b.stop()
    await exportd.cmd("nbd-server-stop")
    await exportd.cmd("blockdev-del", {"node-name": "disk"})
    assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x7a 4M 64k", "-c", "read -P 0x61 1M 1M",
                        str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout
