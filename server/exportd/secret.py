"""secret objects as QEMU's crypto/secret.c and secret_common.c have them:
a value given inline (`data`) or read from a `file`, in `format` raw or
base64, optionally AES-256-CBC encrypted with the value of another secret
(`keyid`, 32 bytes) and a base64 `iv` (16 bytes). Users look a secret up by
id (tls-creds-x509's passwordid) and get its bytes, or its text as UTF-8.

AES comes from the OpenSSL the standard library's `ssl` already loads
(libcrypto, through ctypes): exportd needs no crypto package for it.
"""

from __future__ import annotations

import binascii
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")  # QEMU's set
AES_KEY_LEN, AES_BLOCK = 32, 16


class SecretError(Exception):
    """A secret that cannot load or be used; str() is QEMU's text."""


@dataclass
class Secret:
    id: str
    data: str | None = None
    file: str | None = None
    format: str = "raw"
    keyid: str | None = None
    iv: str | None = None
    # the value of another secret by id (for keyid), SecretError if none
    lookup: Callable[[str], bytes] | None = None
    value: bytes | None = None  # after load()

    qom_type = "secret"

    @classmethod
    def from_args(cls, args: dict[str, Any], lookup: Callable[[str], bytes]) -> Secret:
        return cls(id=args["id"], data=args.get("data"), file=args.get("file"), format=args.get("format", "raw"),
                   keyid=args.get("keyid"), iv=args.get("iv"), lookup=lookup)

    def load(self) -> None:
        """Read, decode and decrypt the value (blocking: reads `file`)."""
        raw = self._load_data()
        if self.keyid is not None:
            self.value = self._decrypt(raw)
        elif self.format == "base64":
            self.value = b64decode(raw)
        else:
            self.value = raw

    def _load_data(self) -> bytes:
        if self.file is not None:
            if self.data is not None:
                raise SecretError("'file' and 'data' are mutually exclusive")
            return _file_contents(self.file)
        if self.data is not None:
            return self.data.encode()
        raise SecretError("Either 'file' or 'data' must be provided")

    def _decrypt(self, raw: bytes) -> bytes:
        assert self.keyid is not None and self.lookup is not None
        key = self.lookup(self.keyid)
        if len(key) != AES_KEY_LEN:
            raise SecretError(f"Key should be {AES_KEY_LEN} bytes in length")
        if self.iv is None:
            raise SecretError("IV is required to decrypt secret")
        iv = b64decode(self.iv.encode())
        if len(iv) != AES_BLOCK:
            raise SecretError(f"IV should be {AES_BLOCK} bytes in length not {len(iv)}")
        ciphertext = b64decode(raw) if self.format == "base64" else raw
        if len(ciphertext) % AES_BLOCK:
            raise SecretError(f"Length {len(ciphertext)} must be a multiple of block size {AES_BLOCK}")
        plain = aes256_cbc_decrypt(key, iv, ciphertext)
        if not plain:
            return plain
        pad = plain[-1]
        if pad > len(plain):
            raise SecretError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        return plain[:len(plain) - pad]

    def as_utf8(self) -> str:
        """The value as text (qcrypto_secret_lookup_as_utf8)."""
        assert self.value is not None
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"Data from secret {self.id} is not valid UTF-8") from None


def b64decode(data: bytes) -> bytes:
    """qbase64_decode(): only base64 characters, then glib's lenient decoding
    (missing padding is fine)."""
    if b"\0" in data:
        raise SecretError("Base64 data contains embedded NUL characters")
    if not BASE64_CHARS.issuperset(data):
        raise SecretError("Base64 data contains invalid characters")
    body = data.replace(b"\n", b"").split(b"=", 1)[0]
    body = body[:len(body) - len(body) % 4] if len(body) % 4 == 1 else body
    return binascii.a2b_base64(body + b"=" * (-len(body) % 4))


def _file_contents(path: str) -> bytes:
    """g_file_get_contents() with glib's texts (“…” quotes included)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"Unable to read {path}: Failed to open file “{path}”: {os.strerror(e.errno or 5)}") from None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise SecretError(f"Unable to read {path}: Error reading file “{path}”: {os.strerror(e.errno or 5)}") from None
    finally:
        os.close(fd)


# --- AES-256-CBC without padding, from libcrypto -------------------------------------------
_libcrypto: Any = None


def _crypto() -> Any:
    global _libcrypto
    if _libcrypto is None:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_aes_256_cbc.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.EVP_DecryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                          ctypes.c_char_p, ctypes.c_int]
        lib.EVP_DecryptFinal_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        _libcrypto = lib
    return _libcrypto


def aes256_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """Whole blocks in, whole blocks out: the padding is the caller's (QEMU strips it itself)."""
    lib = _crypto()
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise SecretError("Cannot create AES context")
    try:
        out = ctypes.create_string_buffer(len(ciphertext) + AES_BLOCK)
        n, tail = ctypes.c_int(0), ctypes.c_int(0)
        ok = (lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_256_cbc(), None, key, iv) == 1
              and lib.EVP_CIPHER_CTX_set_padding(ctx, 0) == 1
              and lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), ciphertext, len(ciphertext)) == 1
              and lib.EVP_DecryptFinal_ex(ctx, ctypes.addressof(out) + n.value, ctypes.byref(tail)) == 1)
        if not ok:
            raise SecretError("Cannot decrypt data")
        return out.raw[:n.value + tail.value]
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)
