"""TLS with X.509 certificates as QEMU's tls-creds-x509 objects have it
(qapi/crypto.json, crypto/tlscredsx509.c), on the standard library's `ssl`.

A TlsCredsX509 is the object's options plus the SSLContexts made from its
directory, laid out as QEMU's:

    ca-cert.pem                      the CA that peers' certificates must chain to (always)
    ca-crl.pem                       revoked certificates (optional; server only)
    server-cert.pem, server-key.pem  endpoint=server (both required)
    client-cert.pem, client-key.pem  endpoint=client (optional: a client may go without)

`load()` reads and checks the files (blocking: call it from a thread) and
raises TlsError with QEMU's texts; after it, `server_context()` and
`client_context(hostname)` are ready. The NBD server and client call
`upgrade()` (streams) or `upgrade_transport()` (protocols) for
NBD_OPT_STARTTLS.

verify-peer (default true): a server then requires a client certificate
signed by the CA; a client verifies the server's certificate against the CA
and that it names the hostname the client must give (QEMU's tls-hostname,
or the host of an inet address). `priority` (a GnuTLS priority
string) is accepted and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"


class TlsError(Exception):
    """A credentials or handshake failure; str() is the text for the user."""


@dataclass
class TlsCredsX509:
    id: str
    dir: str | None = None
    endpoint: str = "client"  # QEMU's default
    verify_peer: bool = True
    sanity_check: bool = True
    priority: str | None = None
    passwordid: str | None = None  # a secret object: the password of an encrypted key
    password_of: Callable[[str], str] | None = field(default=None, repr=False)  # secret id -> text, or TlsError
    _server: ssl.SSLContext | None = field(default=None, repr=False)
    _client: ssl.SSLContext | None = field(default=None, repr=False)

    qom_type = "tls-creds-x509"

    @classmethod
    def from_args(cls, args: dict[str, Any], password_of: Callable[[str], str] | None = None) -> TlsCredsX509:
        """From object-add's validated arguments; `password_of` looks up the
        secret named by passwordid (exportd.objects)."""
        return cls(id=args["id"], dir=args.get("dir"), endpoint=args.get("endpoint", "client"),
                   verify_peer=args.get("verify-peer", True), sanity_check=args.get("sanity-check", True),
                   priority=args.get("priority"), passwordid=args.get("passwordid"), password_of=password_of)

    def path(self, name: str) -> str:
        # QEMU joins with a slash whatever dir is ("" gives "/ca-cert.pem")
        return f"{self.dir}/{name}"

    # --- loading (blocking) ------------------------------------------------------
    def load(self) -> None:
        """Check the directory and build the contexts; TlsError with QEMU's text."""
        if self.dir is None:
            raise TlsError("Missing 'dir' property value")
        server = self.endpoint == "server"
        cacert = _required(self.path(CA_CERT))
        if server:
            crl = _optional(self.path(CA_CRL))
            cert = _required(self.path("server-cert.pem"))
            key = _required(self.path("server-key.pem"))
        else:
            crl = None
            cert = _optional(self.path("client-cert.pem"))
            key = _optional(self.path("client-key.pem"))
        if self.sanity_check and cert is not None:
            _check_pem(cert, "server" if server else "client")
        if server:
            self._server = self._context(ssl.Purpose.CLIENT_AUTH, cacert, crl, cert, key)
        else:
            # a client certificate is used only with its key, as in QEMU
            pair = (cert, key) if cert is not None and key is not None else (None, None)
            self._client = self._context(ssl.Purpose.SERVER_AUTH, cacert, None, *pair)

    def _context(self, purpose: ssl.Purpose, cacert: str, crl: str | None, cert: str | None,
                 key: str | None) -> ssl.SSLContext:
        server = purpose is ssl.Purpose.CLIENT_AUTH
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # before verify_mode: CERT_NONE needs it off
        try:
            ctx.load_verify_locations(cafile=cacert)
        except ssl.SSLError:
            raise TlsError(f"Unable to import CA certificate list {cacert}") from None
        if crl is not None:
            try:
                ctx.load_verify_locations(cafile=crl)
            except ssl.SSLError as e:
                raise TlsError(f"Cannot load CRL '{crl}': {_reason(e)}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if cert is not None and key is not None:
            password = self._password()
            try:
                # never let OpenSSL prompt on the terminal for an encrypted key
                ctx.load_cert_chain(cert, key, password=_no_password if password is None else password)
            except _Encrypted:
                raise TlsError(f"Cannot load certificate '{cert}' & key '{key}': Decryption has failed.") from None
            except ssl.SSLError as e:
                if password is not None and (e.reason is None or e.reason in _BAD_PASSWORD):
                    raise TlsError(f"Cannot load certificate '{cert}' & key '{key}': Decryption has failed.") from None
                raise TlsError(f"Cannot load certificate '{cert}' & key '{key}': {_reason(e)}") from None
            except OSError as e:
                raise TlsError(f"Cannot load certificate '{cert}' & key '{key}': {e.strerror or e}") from None
        if self.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = not server
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _password(self) -> str | None:
        """The text of the passwordid secret, looked up when the key loads (as QEMU)."""
        if self.passwordid is None:
            return None
        if self.password_of is None:
            raise TlsError(f"No secret with id '{self.passwordid}'")
        return self.password_of(self.passwordid)

    # --- contexts --------------------------------------------------------------------
    def server_context(self) -> ssl.SSLContext:
        """The context of a server endpoint (TlsError for client credentials)."""
        if self._server is None:
            raise TlsError("Expected TLS credentials for a server endpoint")
        return self._server

    def client_context(self, hostname: str | None = None) -> ssl.SSLContext:
        """The context of a client endpoint. With verify-peer the server's
        certificate must name `hostname` (pass it to upgrade() too), and, as
        in QEMU, there is no connection without one (QEMU's nbd driver takes
        tls-hostname, else the host of an inet address; a UNIX socket needs
        tls-hostname)."""
        if self._client is None:
            raise TlsError("Expected TLS credentials for a client endpoint")
        if self.verify_peer and not hostname:
            raise TlsError("No hostname for certificate validation")
        return self._client


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    # an encrypted key without passwordid cannot load (and must not prompt)
    raise _Encrypted


# OpenSSL's reasons for a key the given password does not open
_BAD_PASSWORD = frozenset({"BAD_DECRYPT", "BAD_PASSWORD_READ", "UNSUPPORTED", "PEM_LIB"})


def _required(path: str) -> str:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise TlsError(f"Unable to access credentials {path}: {os.strerror(e.errno or errno.EIO)}") from None
    return path


def _optional(path: str) -> str | None:
    try:
        return _required(path)
    except TlsError:
        return None


def _check_pem(path: str, role: str) -> None:
    """The first certificate of `path` decodes (QEMU's sanity check reads it)."""
    head, tail = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
        begin = text.find(head)
        end = text.find(tail, begin)
        if begin < 0 or end < 0:
            raise ValueError("no PEM certificate found")
        ssl.PEM_cert_to_DER_cert(text[begin:end + len(tail)])
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise TlsError(f"Unable to import {role} certificate {path}: {why}") from None


def _reason(e: ssl.SSLError) -> str:
    if e.reason == "KEY_VALUES_MISMATCH":
        return "The certificate and the given key do not match."
    # OpenSSL's reason codes read as words: PEER_DID_NOT_RETURN_A_CERTIFICATE
    return e.reason.replace("_", " ").lower() if e.reason else str(e)


# --- upgrading a connection -------------------------------------------------------------
HANDSHAKE_TIMEOUT_S = 10.0


async def upgrade(writer: asyncio.StreamWriter, ctx: ssl.SSLContext, server_side: bool,
                  server_hostname: str | None = None, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Start TLS on an open stream connection in place (NBD_OPT_STARTTLS).

    `writer` is the StreamWriter of a connection made by asyncio.start_server
    (server_side=True) or asyncio.open_connection / open_unix_connection
    (server_side=False); after the handshake its reader and writer carry
    plaintext over TLS. Call it when the peer waits for us (nothing of the
    handshake may already sit in the reader's buffer): the server after
    sending its STARTTLS reply, the client after reading it. A client passes
    the `server_hostname` it gave client_context(). Raises TlsError on any
    handshake failure or after `timeout` seconds; the caller then closes
    the connection.
    """
    if writer.get_extra_info("ssl_object") is not None:
        raise TlsError("TLS is already started on this connection")
    # asyncio picks the side from how the stream was made: check it agrees
    made_by_server = getattr(writer._protocol, "_client_connected_cb", None) is not None  # type: ignore[attr-defined]
    if made_by_server != server_side:
        raise ValueError(f"upgrade(server_side={server_side}) on a stream made by "
                         f"{'start_server' if made_by_server else 'open_connection'}")
    with _handshake_errors():
        async with asyncio.timeout(timeout):
            await writer.start_tls(ctx, server_hostname=None if server_side else server_hostname,
                                   ssl_handshake_timeout=timeout + 1)


async def upgrade_transport(transport: asyncio.Transport, protocol: asyncio.BaseProtocol, ctx: ssl.SSLContext,
                            server_side: bool, server_hostname: str | None = None,
                            timeout: float = HANDSHAKE_TIMEOUT_S) -> asyncio.Transport:
    """upgrade() for protocol-based code: the TLS transport that replaces
    `transport` (use it from now on; `protocol` keeps receiving, in plaintext)."""
    loop = asyncio.get_running_loop()
    with _handshake_errors():
        async with asyncio.timeout(timeout):
            new = await loop.start_tls(transport, protocol, ctx, server_side=server_side,
                                       server_hostname=None if server_side else server_hostname,
                                       ssl_handshake_timeout=timeout + 1)
    assert new is not None
    return new


@contextlib.contextmanager
def _handshake_errors() -> Iterator[None]:
    """Every way a handshake fails, as one TlsError."""
    try:
        yield
    except (ssl.SSLError, ssl.CertificateError) as e:
        raise TlsError(f"TLS handshake failed: {getattr(e, 'verify_message', None) or _reason(e)}") from None
    except TimeoutError:
        raise TlsError("TLS handshake failed: timed out") from None
    except (ConnectionError, OSError) as e:
        raise TlsError(f"TLS handshake failed: {e.strerror or e}") from None


def peer_certificate(writer: asyncio.StreamWriter) -> dict[str, Any] | None:
    """The verified peer's certificate after upgrade() (None without one)."""
    obj = writer.get_extra_info("ssl_object")
    return obj.getpeercert() if obj is not None else None


def peer_certificate_der(writer: asyncio.StreamWriter) -> bytes | None:
    """The peer's certificate (DER) after upgrade(), verified or not (None without one)."""
    obj = writer.get_extra_info("ssl_object")
    return obj.getpeercert(binary_form=True) if obj is not None else None
