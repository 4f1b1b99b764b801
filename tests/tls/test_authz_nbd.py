"""nbd-server-start's tls-authz: a TLS client gets in only if the authz
object allows its certificate's distinguished name, the string GnuTLS's
gnutls_x509_crt_get_dn() prints (exportd.x509dn). Each flow runs against
qemu-storage-daemon 7.2 and exportd with the same certificates, objects
and clients (qemu-img, nbdinfo); both must give the same answers, and the
answers must be the expected ones. Then what only exportd can show: refused
clients leave no descriptor behind and do not disturb a client in
transmission, and an authz-listfile follows its file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from exportd.tls import TlsCredsX509, upgrade
from exportd.x509dn import subject_dn
from tests.support.daemon import Exportd
from tests.support.programs import qemu_img_info_tls
from tests.support.qsd import QSD, running_qsd
from tests.tls.certs import Pki, creds_dir, issue_client, make_pki

pytestmark = pytest.mark.skipif(QSD is None or shutil.which("nbdinfo") is None or shutil.which("openssl") is None,
                                reason="qemu-storage-daemon, nbdinfo and openssl are needed")

SIZE = 1 << 20
# the subjects, in the order the certificates store them ('+': same RDN as the previous one)
SUBJECTS: dict[str, list[tuple[str, str]]] = {
    "laptop": [("C", "GB"), ("ST", "London"), ("L", "London"), ("O", "Example Org"), ("CN", "laptop.example.com")],
    "intruder": [("C", "GB"), ("O", "Evil"), ("CN", "intruder")],
    "tricky": [("C", "GB"), ("O", 'Example, "Org"+More'), ("OU", "a\\b<c>d;e=f"), ("CN", "#lead sp "),
               ("emailAddress", "x@y.z"), ("DC", "example"), ("1.2.3.4", "foo"), ("serialNumber", "12"),
               ("UID", "u1")],
    "multi": [("O", "Org"), ("CN", "a"), ("+UID", "b"), ("+OU", "c")],
    "utf8": [("CN", "caf\u00e9 \u65e5\u672c"), ("OU", " spaced ")],
}
# ... and their names as GnuTLS prints them (stored order, not RFC 4514's reversed one)
DN = {
    "laptop": "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com",
    "intruder": "C=GB,O=Evil,CN=intruder",
    "tricky": 'C=GB,O=Example\\, \\"Org\\"\\+More,OU=a\\\\b\\<c\\>d\\;e=f,CN=\\#lead sp\\ ,EMAIL=x@y.z,'
              "DC=example,1.2.3.4=#0c03666f6f,serialNumber=12,UID=u1",
    "multi": "O=Org,CN=a+OU=c+UID=b",  # a multi-valued RDN in DER's (sorted) order
    "utf8": "CN=caf\u00e9 \u65e5\u672c,OU=\\ spaced\\ ",
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'server': the server's credentials; one client directory per SUBJECTS entry."""
    root = tmp_path_factory.mktemp("authz-pki")
    pki: Pki = make_pki(root / "ca")
    dirs = {"server": creds_dir(root / "server", pki, client=False)}
    for name, dn in SUBJECTS.items():
        dirs[name] = issue_client(pki, root / name, dn, multivalue=any(k.startswith("+") for k, _ in dn))
    return dirs


def test_dn_as_gnutls_prints_it(certs: dict[str, Path]) -> None:
    for name in SUBJECTS:
        der = ssl.PEM_cert_to_DER_cert((certs[name] / "client-cert.pem").read_text())
        assert subject_dn(der) == DN[name], name


# --- running a flow on either daemon -----------------------------------------------
QMP = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def _reply(client: QMPClient, name: str, args: dict[str, Any]) -> Any:
    try:
        return {"return": await client.execute(name, args)}
    except ExecuteError as e:
        return {"error": [e.error.error.class_, e.error.error.desc]}


@asynccontextmanager
async def serving(who: str, work: Path, *args: str) -> AsyncIterator[QMP]:
    """qemu-storage-daemon or exportd started with `args` in `work`; yields
    a QMP function giving {"return": ...} or {"error": [class, desc]}."""
    work.mkdir(parents=True, exist_ok=True)
    if who == "qsd":
        async with running_qsd(str(work / "qmp.sock"), *args):
            client = QMPClient("authz")
            await client.connect(str(work / "qmp.sock"))
            try:
                await _exports_up(client, args)
                yield lambda name, a: _reply(client, name, a)
            finally:
                await client.disconnect()
    else:
        d = Exportd(work)
        try:
            await d.start(*args)
            assert d.client is not None
            client = d.client
            await _exports_up(client, args)
            yield lambda name, a: _reply(client, name, a)
        finally:
            await d.stop()


async def _exports_up(client: QMPClient, args: tuple[str, ...] | list[str]) -> None:
    """The command line's --export is served (the monitor may answer before)."""
    for _ in range(200):
        if args.count("--export") <= len(await client.execute("query-block-exports")):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the --export never came up")


def server_args(certs: dict[str, Path], work: Path, nbd: str | None, *extra: str,
                verify_peer: bool = True) -> list[str]:
    img = work / "disk.img"
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(b"\xab" * SIZE)
    args = ["--object", f"tls-creds-x509,id=tls0,dir={certs['server']},endpoint=server,"
                        f"verify-peer={'on' if verify_peer else 'off'}",
            *extra, "--blockdev", f"driver=file,node-name=n0,filename={img}"]
    if nbd is not None:
        args += ["--nbd-server", nbd, "--export", "type=nbd,id=e0,node-name=n0,name=disk0"]
    return args


def nbdinfo(sock: Path, client_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--size", f"nbds+unix:///disk0?socket={sock}&tls-certificates={client_dir}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


async def gets_in(sock: Path, client_dir: Path, tool: Callable[..., subprocess.CompletedProcess[str]] = qemu_img_info_tls
                  ) -> bool:
    out = await asyncio.to_thread(tool, sock, client_dir)
    if out.returncode == 0:
        assert str(SIZE) in out.stdout
    return out.returncode == 0


async def on_both(tmp_path: Path, flow: Callable[[str, Path], Awaitable[list[Any]]]) -> list[Any]:
    """flow(who, work) for qemu-storage-daemon then exportd: the same transcript."""
    theirs = await flow("qsd", tmp_path / "qsd")
    ours = await flow("exportd", tmp_path / "exportd")
    assert ours == theirs
    return ours


# --- the flows -------------------------------------------------------------------------
async def test_simple_identity_from_the_command_line(tmp_path: Path, certs: dict[str, Path]) -> None:
    async def flow(who: str, work: Path) -> list[Any]:
        sock = work / "nbd.sock"
        identity = DN["laptop"].replace(",", ",,")  # keyval's comma
        args = server_args(certs, work, f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=auth0",
                           "--object", f"authz-simple,id=auth0,identity={identity}")
        async with serving(who, work, *args):
            return [await gets_in(sock, certs["laptop"]), await gets_in(sock, certs["laptop"], nbdinfo),
                    await gets_in(sock, certs["intruder"]), await gets_in(sock, certs["intruder"], nbdinfo),
                    await gets_in(sock, certs["laptop"])]  # the server goes on after a refusal

    assert await on_both(tmp_path, flow) == [True, True, False, False, True]


async def test_every_rule_of_the_name(tmp_path: Path, certs: dict[str, Path]) -> None:
    # escaping, an unknown OID, EMAIL, a multi-valued RDN, UTF-8 and spaces: exact rules
    # with exportd's strings must admit exactly those clients through QEMU's GnuTLS too
    names = ("tricky", "multi", "utf8")

    async def flow(who: str, work: Path) -> list[Any]:
        sock = work / "nbd.sock"
        args = server_args(certs, work, f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=acl")
        async with serving(who, work, *args) as qmp:
            added = await qmp("object-add", {"qom-type": "authz-list", "id": "acl",
                                             "rules": [{"match": DN[n], "policy": "allow"} for n in names]})
            return [added] + [await gets_in(sock, certs[n]) for n in (*names, "laptop")]

    assert await on_both(tmp_path, flow) == [{"return": {}}, True, True, True, False]


async def test_globs_and_policies(tmp_path: Path, certs: dict[str, Path]) -> None:
    lists = [
        # the first match decides; nothing matched: the list's policy (default deny)
        {"rules": [{"match": "*CN=intruder", "policy": "deny", "format": "glob"},
                   {"match": "C=G?,*", "policy": "allow", "format": "glob"}]},
        # allow by default, deny a glob; an exact rule that looks like a glob matches nothing
        {"policy": "allow", "rules": [{"match": "O=Org,*", "policy": "deny", "format": "glob"},
                                      {"match": "C=GB,*", "policy": "deny"}]},
        {"policy": "deny", "rules": []},
    ]
    who_tries = ("laptop", "intruder", "multi", "tricky")

    async def flow(who: str, work: Path) -> list[Any]:
        sock = work / "nbd.sock"
        args = server_args(certs, work, None)
        out: list[Any] = []
        async with serving(who, work, *args) as qmp:
            for i, props in enumerate(lists):
                out.append(await qmp("object-add", {"qom-type": "authz-list", "id": f"acl{i}", **props}))
                out.append(await qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                                          "tls-creds": "tls0", "tls-authz": f"acl{i}"}))
                out.append(await qmp("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0",
                                                          "name": "disk0"}))
                out.append([await gets_in(sock, certs[n]) for n in who_tries])
                out.append(await qmp("nbd-server-stop", {}))
        return out

    ours = await on_both(tmp_path, flow)
    assert [r for r in ours if isinstance(r, list)] == [[True, False, False, True], [True, True, False, True],
                                                       [False, False, False, False]]


async def test_authz_id_is_looked_up_at_each_connection(tmp_path: Path, certs: dict[str, Path]) -> None:
    async def flow(who: str, work: Path) -> list[Any]:
        sock = work / "nbd.sock"
        addr = {"type": "unix", "data": {"path": str(sock)}}
        out: list[Any] = []
        async with serving(who, work, *server_args(certs, work, None)) as qmp:
            async def start(authz: str) -> None:
                out.append(await qmp("nbd-server-start", {"addr": addr, "tls-creds": "tls0", "tls-authz": authz}))
                out.append(await qmp("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0",
                                                          "name": "disk0"}))

            await start("auth9")  # no such object yet: accepted
            out.append(await gets_in(sock, certs["laptop"]))
            out.append(await qmp("object-add", {"qom-type": "authz-simple", "id": "auth9",
                                                "identity": DN["laptop"]}))
            out.append([await gets_in(sock, certs[n]) for n in ("laptop", "intruder")])
            out.append(await qmp("object-del", {"id": "auth9"}))  # in use by the server: still deleted
            out.append(await gets_in(sock, certs["laptop"]))
            out.append(await qmp("object-add", {"qom-type": "authz-list", "id": "auth9", "policy": "allow"}))
            out.append(await gets_in(sock, certs["intruder"]))
            out.append(await qmp("nbd-server-stop", {}))
            for authz in ("tls0", ""):  # not an authz object; an empty id
                await start(authz)
                out.append(await gets_in(sock, certs["laptop"]))
                out.append(await qmp("nbd-server-stop", {}))
        return out

    ours = await on_both(tmp_path, flow)
    assert [r for r in ours if not isinstance(r, dict)] == [False, [True, False], False, True, False, False]
    assert all(r == {"return": {}} for r in ours if isinstance(r, dict))


async def test_without_verify_peer_authz_is_unused(tmp_path: Path, certs: dict[str, Path]) -> None:
    # QEMU checks the certificate (and so the authz) only with verify-peer
    async def flow(who: str, work: Path) -> list[Any]:
        sock = work / "nbd.sock"
        args = server_args(certs, work, f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=none",
                           "--object", "authz-list,id=none,policy=deny", verify_peer=False)
        async with serving(who, work, *args):
            return [await gets_in(sock, certs[n]) for n in ("laptop", "intruder")]

    assert await on_both(tmp_path, flow) == [True, True]


# --- exportd only ----------------------------------------------------------------------
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_LIST, OPT_STARTTLS, OPT_ABORT = 3, 5, 2
REP_ACK, REP_SERVER = 1, 2


class NbdTlsClient:
    """A bare NBD client: the handshake, STARTTLS with a client certificate,
    then NBD_OPT_LIST as often as asked (the connection stays open)."""

    def __init__(self, sock: Path, client_dir: Path) -> None:
        self.sock, self.creds = sock, TlsCredsX509(id="c", dir=str(client_dir))
        self.creds.load()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.sock))
        _, _, flags = struct.unpack(">QQH", await self.reader.readexactly(18))
        self.writer.write(struct.pack(">I", 1 | (flags & 2)))
        await self._option(OPT_STARTTLS)
        assert (await self._reply())[0] == REP_ACK
        await upgrade(self.writer, self.creds.client_context("localhost"), server_side=False,
                      server_hostname="localhost")

    async def _option(self, code: int) -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, code, 0))
        await self.writer.drain()

    async def _reply(self) -> tuple[int, bytes]:
        magic, _, rtype, length = struct.unpack(">QIII", await self.reader.readexactly(20))
        assert magic == REPLY_MAGIC
        return rtype, await self.reader.readexactly(length)

    async def names(self) -> list[str]:
        await self._option(OPT_LIST)
        names = []
        while (r := await self._reply())[0] == REP_SERVER:
            names.append(r[1][4:4 + struct.unpack(">I", r[1][:4])[0]].decode())
        assert r[0] == REP_ACK
        return names

    def close(self) -> None:
        self.writer.close()


async def test_refused_clients_leak_nothing(workdir: Path, certs: dict[str, Path]) -> None:
    sock = workdir / "nbd.sock"
    args = server_args(certs, workdir, f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=auth0",
                       "--object", f"authz-simple,id=auth0,identity={DN['laptop'].replace(',', ',,')}")
    d = Exportd(workdir)
    try:
        await d.start(*args)
        assert d.client is not None
        await _exports_up(d.client, tuple(args))
        inside = NbdTlsClient(sock, certs["laptop"])
        await inside.connect()
        assert await inside.names() == ["disk0"]
        fds = Path(f"/proc/{d.pid}/fd")
        before = len(os.listdir(fds))
        for _ in range(3):
            assert not await gets_in(sock, certs["intruder"])
            assert not await gets_in(sock, certs["intruder"], nbdinfo)
        refused = NbdTlsClient(sock, certs["intruder"])  # the handshake itself succeeds, then nothing
        await refused.connect()
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
            await refused.names()
        refused.close()
        for _ in range(100):  # the server closes its side as soon as the check fails
            if len(os.listdir(fds)) <= before:
                break
            await asyncio.sleep(0.05)
        assert len(os.listdir(fds)) <= before
        assert await inside.names() == ["disk0"]  # the client inside never noticed
        assert await gets_in(sock, certs["laptop"])
        inside.close()
        await d.cmd("nbd-server-stop")
    finally:
        await d.stop()


async def test_listfile_follows_its_file(workdir: Path, certs: dict[str, Path]) -> None:
    acl, frozen = workdir / "acl" / "nbd.json", workdir / "acl" / "frozen.json"
    acl.parent.mkdir()

    def allow(*names: str, policy: str = "deny") -> str:
        return json.dumps({"policy": policy, "rules": [{"match": DN[n], "policy": "allow"} for n in names]})

    acl.write_text(allow("laptop"))
    frozen.write_text(allow("laptop"))
    sock = workdir / "nbd.sock"
    d = Exportd(workdir)
    try:
        await d.start(*server_args(certs, workdir, None))
        await d.cmd("object-add", {"qom-type": "authz-listfile", "id": "acl", "filename": str(acl)})
        await d.cmd("object-add", {"qom-type": "authz-listfile", "id": "frozen", "filename": str(frozen),
                                   "refresh": False})

        async def admitted(authz: str) -> list[bool]:
            await d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                             "tls-creds": "tls0", "tls-authz": authz})
            await d.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk0"})
            try:
                return [await gets_in(sock, certs[n]) for n in ("laptop", "intruder")]
            finally:
                await d.cmd("nbd-server-stop")

        assert await admitted("acl") == [True, False]
        acl.write_text(allow("intruder"))  # rewritten in place
        frozen.write_text(allow("intruder"))
        assert await admitted("acl") == [False, True]
        assert await admitted("frozen") == [True, False]  # refresh=off: read once
        new = acl.with_suffix(".new")
        new.write_text(allow(policy="allow"))
        new.rename(acl)  # moved into place
        assert await admitted("acl") == [True, True]
        acl.write_text('{"policy": ')  # broken: nobody, until it is fixed
        assert await admitted("acl") == [False, False]
        acl.unlink()  # gone: the last list stays (QEMU reads only on a change or a creation)
        assert await admitted("acl") == [False, False]
        acl.write_text(allow("laptop"))  # created again
        assert await admitted("acl") == [True, False]
        await d.cmd("object-del", {"id": "acl"})
        await d.cmd("object-del", {"id": "frozen"})
    finally:
        await d.stop()
