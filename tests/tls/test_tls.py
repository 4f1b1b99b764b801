"""exportd.tls: contexts from QEMU's credentials layout, and upgrade() over
real loopback connections (asyncio.start_server / open_connection)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exportd.tls import TlsCredsX509, TlsError, peer_certificate, upgrade, upgrade_transport
from tests.tls.certs import Pki, creds_dir, make_crl


def loaded(d: Path, endpoint: str, **kw: object) -> TlsCredsX509:
    c = TlsCredsX509(id="t", dir=str(d), endpoint=endpoint, **kw)  # type: ignore[arg-type]
    c.load()
    return c


@contextlib.asynccontextmanager
async def tls_server(creds: TlsCredsX509) -> AsyncIterator[tuple[int, asyncio.Queue[object]]]:
    """A loopback server that says "go", upgrades, then echoes one line;
    each connection's outcome (the peer certificate, or the TlsError) goes
    to the queue."""
    outcomes: asyncio.Queue[object] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"go\n")  # as an NBD server acks STARTTLS, then waits for the ClientHello
            await writer.drain()
            await upgrade(writer, creds.server_context(), server_side=True)
            outcomes.put_nowait(peer_certificate(writer))
            writer.write(await reader.readline())
            await writer.drain()
        except TlsError as e:
            outcomes.put_nowait(e)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], outcomes
    finally:
        server.close()
        await server.wait_closed()


async def client_round_trip(port: int, creds: TlsCredsX509, hostname: str | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await reader.readline() == b"go\n"
        await upgrade(writer, creds.client_context(hostname), server_side=False, server_hostname=hostname)
        writer.write(b"hello over tls\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_round_trip_with_client_certificate(creds: dict[str, Path]) -> None:
    server, client = loaded(creds["server"], "server"), loaded(creds["client"], "client")
    async with tls_server(server) as (port, outcomes):
        assert await client_round_trip(port, client, hostname="127.0.0.1") == b"hello over tls\n"
        cert = await outcomes.get()
    assert isinstance(cert, dict)
    assert ("commonName", "exportd-test-client") in [kv for rdn in cert["subject"] for kv in rdn]


async def test_hostname_is_checked(creds: dict[str, Path]) -> None:
    server, client = loaded(creds["server"], "server"), loaded(creds["client"], "client")
    async with tls_server(server) as (port, _):
        assert await client_round_trip(port, client, hostname="localhost") == b"hello over tls\n"
        with pytest.raises(TlsError, match="^TLS handshake failed: Hostname mismatch"):
            await client_round_trip(port, client, hostname="elsewhere.example")
        # QEMU's client verifying a certificate will not go without a name to check
        with pytest.raises(TlsError, match="^No hostname for certificate validation$"):
            await client_round_trip(port, client)
    lax = loaded(creds["client"], "client", verify_peer=False)
    async with tls_server(loaded(creds["server"], "server")) as (port, _):
        assert await client_round_trip(port, lax) == b"hello over tls\n"


async def test_client_trusting_another_ca_is_refused(tmp_path: Path, creds: dict[str, Path],
                                                     pki: Pki, other_pki: Pki) -> None:
    server = loaded(creds["server"], "server")
    stranger = loaded(creds_dir(tmp_path / "stranger", pki, server=False, ca=other_pki.ca_cert), "client")
    async with tls_server(server) as (port, outcomes):
        with pytest.raises(TlsError, match="^TLS handshake failed: (self-signed certificate in certificate chain|unable to get local issuer)"):
            await client_round_trip(port, stranger, hostname="127.0.0.1")
        assert isinstance(await asyncio.wait_for(outcomes.get(), 10), TlsError)
    # and verify-peer=off on the client trusts anyone, as QEMU's
    lax = loaded(tmp_path / "stranger", "client", verify_peer=False)
    async with tls_server(loaded(creds["server"], "server", verify_peer=False)) as (port, _):
        assert await client_round_trip(port, lax) == b"hello over tls\n"


async def test_verify_peer_requires_a_client_certificate(tmp_path: Path, creds: dict[str, Path]) -> None:
    anonymous_dir = tmp_path / "anon"
    anonymous_dir.mkdir()
    shutil.copy(creds["client"] / "ca-cert.pem", anonymous_dir)
    anonymous = loaded(anonymous_dir, "client")
    async with tls_server(loaded(creds["server"], "server")) as (port, outcomes):
        # TLS 1.3: the client may finish its handshake before the server refuses
        with contextlib.suppress(TlsError, ConnectionError, asyncio.IncompleteReadError):
            reply = await client_round_trip(port, anonymous, hostname="127.0.0.1")
            assert reply == b""  # refused: nothing echoed
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert isinstance(outcome, TlsError)
        assert str(outcome) == "TLS handshake failed: peer did not return a certificate"
    async with tls_server(loaded(creds["server"], "server", verify_peer=False)) as (port, outcomes):
        assert await client_round_trip(port, anonymous, hostname="127.0.0.1") == b"hello over tls\n"
        assert await outcomes.get() in (None, {})


async def test_client_certificate_from_another_ca_is_refused(tmp_path: Path, creds: dict[str, Path],
                                                             pki: Pki, other_pki: Pki) -> None:
    # trusts the right CA, but presents a certificate the server's CA never signed
    forged = creds_dir(tmp_path / "forged", other_pki, server=False, ca=pki.ca_cert)
    async with tls_server(loaded(creds["server"], "server")) as (port, outcomes):
        with contextlib.suppress(TlsError, ConnectionError, asyncio.IncompleteReadError):
            assert await client_round_trip(port, loaded(forged, "client"), hostname="127.0.0.1") == b""
        assert isinstance(await asyncio.wait_for(outcomes.get(), 10), TlsError)


async def test_revoked_client_certificate_is_refused(creds: dict[str, Path], pki: Pki) -> None:
    client = loaded(creds["client"], "client")
    make_crl(pki, creds["server"] / "ca-crl.pem")  # revokes nothing
    async with tls_server(loaded(creds["server"], "server")) as (port, _):
        assert await client_round_trip(port, client, hostname="localhost") == b"hello over tls\n"
    make_crl(pki, creds["server"] / "ca-crl.pem", revoke=pki.client_cert)
    async with tls_server(loaded(creds["server"], "server")) as (port, outcomes):
        with contextlib.suppress(TlsError, ConnectionError, asyncio.IncompleteReadError):
            assert await client_round_trip(port, client, hostname="localhost") == b""
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert str(outcome) == "TLS handshake failed: certificate revoked"


async def test_stalled_handshake_times_out(creds: dict[str, Path]) -> None:
    server = loaded(creds["server"], "server")
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await upgrade(writer, server.server_context(), server_side=True, timeout=0.5)
            outcome.set_result("upgraded")
        except TlsError as e:
            outcome.set_result(e)
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        result = await asyncio.wait_for(outcome, 10)  # the client never sends its ClientHello
        assert str(result) == "TLS handshake failed: timed out"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection is closed
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_upgrade_transport_for_protocols(creds: dict[str, Path]) -> None:
    """upgrade_transport(): a Protocol-based client against the streams server."""
    client = loaded(creds["client"], "client")
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Lines(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.put_nowait(data)

    async with tls_server(loaded(creds["server"], "server")) as (port, outcomes):
        transport, protocol = await loop.create_connection(Lines, "127.0.0.1", port)
        try:
            assert await got.get() == b"go\n"
            tls = await upgrade_transport(transport, protocol, client.client_context("127.0.0.1"),  # type: ignore[arg-type]
                                          server_side=False, server_hostname="127.0.0.1")
            tls.write(b"via a protocol\n")
            assert await asyncio.wait_for(got.get(), 10) == b"via a protocol\n"
            assert isinstance(await outcomes.get(), dict)
        finally:
            transport.close()


async def test_upgrade_checks_the_side(creds: dict[str, Path]) -> None:
    client = loaded(creds["client"], "client")
    async with tls_server(loaded(creds["server"], "server")) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(ValueError, match="open_connection"):
                await upgrade(writer, client.client_context("localhost"), server_side=True)
        finally:
            writer.close()


@pytest.mark.parametrize(("endpoint", "missing", "text"), [
    ("server", "ca-cert.pem", "Unable to access credentials {d}/ca-cert.pem: No such file or directory"),
    ("server", "server-cert.pem", "Unable to access credentials {d}/server-cert.pem: No such file or directory"),
    ("server", "server-key.pem", "Unable to access credentials {d}/server-key.pem: No such file or directory"),
    ("client", "ca-cert.pem", "Unable to access credentials {d}/ca-cert.pem: No such file or directory"),
])
def test_missing_files(tmp_path: Path, pki: Pki, endpoint: str, missing: str, text: str) -> None:
    d = creds_dir(tmp_path / "c", pki)
    (d / missing).unlink()
    with pytest.raises(TlsError) as e:
        loaded(d, endpoint)
    assert str(e.value) == text.format(d=d)


def test_client_certificate_is_optional(tmp_path: Path, pki: Pki) -> None:
    d = creds_dir(tmp_path / "c", pki, client=False, server=False)
    loaded(d, "client").client_context("127.0.0.1")


def test_bad_files(tmp_path: Path, pki: Pki) -> None:
    d = creds_dir(tmp_path / "c", pki)
    shutil.copy(pki.client_key, d / "server-key.pem")
    with pytest.raises(TlsError) as e:
        loaded(d, "server")
    assert str(e.value) == (f"Cannot load certificate '{d}/server-cert.pem' & key '{d}/server-key.pem': "
                            "The certificate and the given key do not match.")
    d = creds_dir(tmp_path / "g", pki)
    (d / "ca-cert.pem").write_text("garbage\n")
    with pytest.raises(TlsError) as e:
        loaded(d, "client")
    assert str(e.value) == f"Unable to import CA certificate list {d}/ca-cert.pem"
    d = creds_dir(tmp_path / "crl", pki)
    (d / "ca-crl.pem").write_text("junk\n")
    with pytest.raises(TlsError, match=f"^Cannot load CRL '{d}/ca-crl.pem': "):
        loaded(d, "server")
    loaded(d, "client")  # a client does not read the CRL, as in QEMU
    d = creds_dir(tmp_path / "cc", pki)
    (d / "client-cert.pem").write_text("junk\n")
    with pytest.raises(TlsError, match=f"^Unable to import client certificate {d}/client-cert.pem: "):
        loaded(d, "client")


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, pki: Pki) -> None:
    d = creds_dir(tmp_path / "c", pki)
    subprocess.run(["openssl", "ec", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
                    "-out", str(d / "server-key.pem")], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    with pytest.raises(TlsError) as e:
        loaded(d, "server")
    assert str(e.value) == (f"Cannot load certificate '{d}/server-cert.pem' & key '{d}/server-key.pem': "
                            "Decryption has failed.")


def test_wrong_endpoint(creds: dict[str, Path]) -> None:
    with pytest.raises(TlsError, match="^Expected TLS credentials for a server endpoint$"):
        loaded(creds["client"], "client").server_context()
    with pytest.raises(TlsError, match="^Expected TLS credentials for a client endpoint$"):
        loaded(creds["server"], "server").client_context()
    with pytest.raises(TlsError, match="^Missing 'dir' property value$"):
        TlsCredsX509(id="t").load()
