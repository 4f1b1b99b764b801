"""Test certificates made with the `openssl` program, in QEMU's layout.

make_pki(root) writes a CA and, signed by it, a server certificate (SAN
127.0.0.1, ::1, localhost) and a client certificate; then
creds_dir(...) lays out a directory as a tls-creds-x509 object expects:

    ca-cert.pem                      the CA to trust
    server-cert.pem, server-key.pem  (endpoint=server)
    client-cert.pem, client-key.pem  (endpoint=client)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pki:
    """One CA and the certificates it signed (paths)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def _issue(d: Path, name: str, subject: str, ext: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert, extfile = (d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}-cert.pem",
                               d / f"{name}.ext")
    extfile.write_text(ext)
    _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-subj", subject, "-out", str(csr), cwd=d)
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-days", "2", "-sha256", "-extfile", str(extfile), "-out", str(cert), cwd=d)
    return cert, key


def make_pki(root: Path, name: str = "Test CA") -> Pki:
    """A fresh CA with a server and a client certificate, under `root`."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = root / "ca-key.pem", root / "ca-cert.pem"
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(ca_key), "-subj", f"/CN={name}", "-days", "2", "-sha256",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca_cert), cwd=root)
    ca = (ca_cert, ca_key)
    server = _issue(root, "server", "/CN=localhost",
                    "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n", ca)
    client = _issue(root, "client", "/CN=exportd-test-client",
                    "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=clientAuth\n", ca)
    return Pki(ca_cert, ca_key, server[0], server[1], client[0], client[1])


def creds_dir(path: Path, pki: Pki, *, server: bool = True, client: bool = True,
              ca: Path | None = None) -> Path:
    """A directory in QEMU's layout for a tls-creds-x509 object; `ca`
    replaces the trusted CA (a client that trusts another CA)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca or pki.ca_cert, path / "ca-cert.pem")
    if server:
        shutil.copy(pki.server_cert, path / "server-cert.pem")
        shutil.copy(pki.server_key, path / "server-key.pem")
    if client:
        shutil.copy(pki.client_cert, path / "client-cert.pem")
        shutil.copy(pki.client_key, path / "client-key.pem")
    return path


def make_crl(pki: Pki, out: Path, revoke: Path | None = None) -> Path:
    """A CRL signed by `pki`'s CA listing `revoke` (or nothing), at `out`."""
    work = out.parent / f".{out.name}.ca"
    work.mkdir(parents=True, exist_ok=True)
    (work / "index.txt").write_text("")
    (work / "crlnumber").write_text("01\n")
    (work / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
                                 "default_md = sha256\ndefault_crl_days = 2\n")
    ca = ("-keyfile", str(pki.ca_key), "-cert", str(pki.ca_cert))
    if revoke is not None:
        _run("ca", "-config", "ca.cnf", "-revoke", str(revoke), *ca, cwd=work)
    _run("ca", "-config", "ca.cnf", "-gencrl", *ca, "-out", str(out), cwd=work)
    return out


def issue_client(pki: Pki, d: Path, dn: list[tuple[str, str]], *, multivalue: bool = False) -> Path:
    """A client certificate signed by `pki`'s CA whose subject is `dn`
    ((field, value) pairs in the order the certificate stores them; with
    `multivalue`, a field whose name starts with '+' joins the previous RDN),
    in a directory laid out for endpoint=client (ca-cert.pem,
    client-cert.pem, client-key.pem). Values are UTF-8 strings, given to
    openssl through a config file so that any character survives."""
    d.mkdir(parents=True, exist_ok=True)
    lines, seen = [], 0
    for name, value in dn:
        # openssl's config: "N." lets a field repeat, "+" joins the previous RDN,
        # a quoted value keeps its spaces and '#'
        plus = name.startswith("+")
        seen += 1
        quoted = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{seen}.{"+" if plus else ""}{name.lstrip("+")}="{quoted}"')
    (d / "req.cnf").write_text("[req]\ndistinguished_name=dn\nprompt=no\nutf8=yes\nstring_mask=utf8only\n"
                               "[dn]\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (d / "client.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                  "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=clientAuth\n")
    _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "client-key.pem", "-config", "req.cnf", *(["-multivalue-rdn"] if multivalue else []),
         "-out", "client.csr", cwd=d)
    _run("x509", "-req", "-in", "client.csr", "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
         "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "client.ext", "-out", "client-cert.pem", cwd=d)
    shutil.copy(pki.ca_cert, d / "ca-cert.pem")
    return d
