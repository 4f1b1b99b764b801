"""object-add / object-del / --object for tls-creds-x509 on a real exportd,
and the same script against qemu-storage-daemon 7.2 (identical replies)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exportd.errors import QMPError
from exportd.objects import registry_of, tls_creds
from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of, running_qsd
from tests.tls.certs import Pki, creds_dir


def x509(oid: str, d: Path | str, **kw: Any) -> tuple[str, dict[str, Any]]:
    return ("object-add", {"qom-type": "tls-creds-x509", "id": oid, "dir": str(d), **kw})


def layouts(root: Path, pki: Pki) -> dict[str, Path]:
    """Credential directories, good and broken, shared by both daemons."""
    d = {"full": creds_dir(root / "full", pki),
         "ca-only": creds_dir(root / "ca-only", pki, server=False, client=False),
         "no-key": creds_dir(root / "no-key", pki, client=False),
         "mismatch": creds_dir(root / "mismatch", pki),
         "garbage-ca": creds_dir(root / "garbage-ca", pki),
         "encrypted": creds_dir(root / "encrypted", pki),
         "empty": root / "empty"}
    subprocess.run(["openssl", "ec", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
                    "-out", str(d["encrypted"] / "server-key.pem")], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    (d["no-key"] / "server-key.pem").unlink()
    shutil.copy(pki.client_key, d["mismatch"] / "server-key.pem")
    (d["garbage-ca"] / "ca-cert.pem").write_text("garbage\n")
    d["empty"].mkdir()
    return d


def script(d: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    return [
        x509("tls0", d["full"], endpoint="server"),
        x509("tls0", d["full"], endpoint="server"),  # duplicate
        x509("tls0", d["empty"], endpoint="server"),  # duplicate is checked before the files
        x509("srv", d["ca-only"], endpoint="server"),
        x509("srv", d["no-key"], endpoint="server"),
        x509("srv", d["mismatch"], endpoint="server"),
        x509("srv", d["garbage-ca"], endpoint="server"),
        x509("srv", d["encrypted"], endpoint="server"),
        x509("srv", d["empty"], endpoint="client", **{"verify-peer": False}),
        x509("srv", d["full"] / "ca-cert.pem", endpoint="client"),
        x509("srv", d["full"], endpoint="middle"),
        x509("srv", d["full"], bogus=1),
        x509("srv", d["full"], **{"verify-peer": "yes"}),
        x509("srv", d["full"], endpoint="server", loaded=True),
        x509("srv", d["full"], endpoint="server", passwordid="sec0"),
        x509("1bad", d["full"]),
        x509("", d["full"]),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "nodir"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "nodir", "endpoint": "server"}),
        ("object-add", {"qom-type": "no-such-type", "id": "x"}),
        ("object-add", {"qom-type": "tls-creds-x509"}),
        ("object-add", {"id": "x"}),
        x509("cli", d["ca-only"]),  # endpoint defaults to client; its certificate is optional
        x509("cli.2_x-y", d["full"], endpoint="client", **{"verify-peer": False, "sanity-check": False,
                                                            "priority": "NORMAL"}),
        ("object-del", {"id": "tls0"}),
        ("object-del", {"id": "tls0"}),
        x509("tls0", d["full"], endpoint="server"),  # the id is free again
        ("object-del", {"id": "cli"}),
        ("object-del", {"id": "srv"}),
        ("object-del", {"id": ""}),
        ("object-del", {}),
        ("object-del", {"id": "tls0", "force": True}),
    ]


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_same_replies_as_qemu(daemon, tmp_path: Path, pki: Pki) -> None:
    steps = script(layouts(tmp_path / "creds", pki))
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
    ours = await replies_of(daemon().socket, steps)
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        assert a == b, (i, step)
    assert sum("return" in r for r in ours) == 6  # the script does succeed where it should


async def test_command_line_object(workdir: Path, creds: dict[str, Path]) -> None:
    d = Exportd(workdir)
    try:
        await d.start("--object", f"tls-creds-x509,id=tls0,dir={creds['server']},endpoint=server,verify-peer=off",
                      "--object", f'{{"qom-type": "tls-creds-x509", "id": "tls1", "dir": "{creds["client"]}"}}')
        for oid in ("tls0", "tls1"):
            assert await d.error("object-add", {"qom-type": "tls-creds-x509", "id": oid,
                                                "dir": str(creds["server"])}) == \
                f"attempt to add duplicate property '{oid}' to object (type 'container')"
        await d.cmd("object-del", {"id": "tls0"})
        assert await d.error("object-del", {"id": "tls0"}) == "object 'tls0' not found"
        await d.cmd("object-del", {"id": "tls1"})
        cmds = {c["name"] for c in await d.cmd("query-commands")}
        assert {"object-add", "object-del"} <= cmds
    finally:
        await d.stop()


@pytest.mark.parametrize(("option", "text"), [
    ("tls-creds-x509,id=tls0,dir={d},endpoint=server",
     "exportd: Unable to access credentials {d}/ca-cert.pem: No such file or directory"),
    ("tls-creds-x509,id=tls0,dir={d},endpoint=server,foo=bar", "exportd: Parameter 'foo' is unexpected"),
    ("no-such-type,id=x", "exportd: Parameter 'qom-type' does not accept value 'no-such-type'"),
])
def test_command_line_errors(tmp_path: Path, option: str, text: str) -> None:
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "exportd", "--socket", str(tmp_path / "s.sock"),
                           "--object", option.format(d=missing)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    # QEMU names the option first
    expected = text.format(d=missing).replace("exportd: ", f"exportd: --object {option.format(d=missing)}: ", 1)
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "s.sock").exists()


class OneDaemon:
    """Stands for the daemon: the registry needs only something to belong to."""


async def test_tls_creds_lookup_texts(creds: dict[str, Path]) -> None:
    # nbd-server-start / blockdev-add driver=nbd texts, as qemu-storage-daemon 7.2 gives them
    owner = OneDaemon()
    reg = registry_of(owner)
    await reg.add({"qom-type": "tls-creds-x509", "id": "srv", "dir": str(creds["server"]), "endpoint": "server"})
    await reg.add({"qom-type": "tls-creds-x509", "id": "cli", "dir": str(creds["client"])})
    assert tls_creds(owner, "srv", "server").server_context() is not None
    assert tls_creds(owner, "cli", "client").client_context("localhost").check_hostname
    for oid, endpoint, text in [("nope", "server", "No TLS credentials with id 'nope'"),
                                ("cli", "server", "Expected TLS credentials for a server endpoint"),
                                ("srv", "client", "Expected TLS credentials for a client endpoint")]:
        with pytest.raises(QMPError) as e:
            tls_creds(owner, oid, endpoint)
        assert e.value.desc == text
    assert registry_of(OneDaemon()).get("srv") is None  # one registry per daemon
