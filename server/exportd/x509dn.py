"""A certificate's subject as the text QEMU authorizes: the distinguished
name exactly as GnuTLS's gnutls_x509_crt_get_dn() prints it (QEMU's
crypto/tlssession.c hands that string to the tls-authz object).

That function keeps GnuTLS's "compat" form (lib/x509/dn.c with
GNUTLS_X509_DN_FLAG_COMPAT), which is not RFC 4514's reversed order:

- the RDNs in the order the certificate stores them (usually C first, CN
  last), joined by ','; the values of a multi-valued RDN joined by '+', in
  stored order;
- each value as NAME=text: NAME from GnuTLS's table (C, ST, L, O, OU, CN,
  EMAIL, DC, UID, serialNumber, title...), else the dotted OID;
- a text is escaped as lib/x509/common.c str_escape() does: a backslash
  before , + " \\ < > ; anywhere, before # or a space at the start and
  before a space at the end;
- a value GnuTLS cannot decode as its type (an unknown OID, a tag other
  than the one the OID expects, a NUL inside) is '#' and the lowercase hex
  of its whole DER encoding, unescaped; a TeletexString with non-printable
  bytes or a UniversalString is '#' and the hex of its contents (escaped:
  so it starts '\\#').

Checked against qemu-storage-daemon 7.2 (GnuTLS 3.7) with certificates that
use each rule (tests/tls/test_authz_nbd.py).
"""

from __future__ import annotations

# ASN.1 universal tags
SEQUENCE, SET, OID_TAG = 0x30, 0x31, 0x06
UTF8, PRINTABLE, TELETEX, IA5, UNIVERSAL, BMP, NUMERIC, OCTET = 0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E, 0x12, 0x04
DIRECTORY_STRING = frozenset({TELETEX, PRINTABLE, UNIVERSAL, UTF8, BMP})
DIRECTORY = "DirectoryString"  # the CHOICE above; otherwise exactly one tag is accepted

# GnuTLS's _oid2str table (lib/x509/common.c): OID -> (name or None, the type it decodes)
_OIDS: dict[str, tuple[str | None, str | int]] = {
    "1.3.6.1.5.5.7.9.2": ("placeOfBirth", DIRECTORY),
    "1.3.6.1.5.5.7.9.3": ("gender", PRINTABLE),
    "1.3.6.1.5.5.7.9.4": ("countryOfCitizenship", PRINTABLE),
    "1.3.6.1.5.5.7.9.5": ("countryOfResidence", PRINTABLE),
    "2.5.4.6": ("C", PRINTABLE),
    "2.5.4.9": ("street", DIRECTORY),
    "2.5.4.12": ("title", DIRECTORY),
    "2.5.4.10": ("O", DIRECTORY),
    "2.5.4.11": ("OU", DIRECTORY),
    "2.5.4.3": ("CN", DIRECTORY),
    "2.5.4.7": ("L", DIRECTORY),
    "2.5.4.8": ("ST", DIRECTORY),
    "2.5.4.13": ("description", DIRECTORY),
    "2.5.4.5": ("serialNumber", PRINTABLE),
    "2.5.4.20": ("telephoneNumber", PRINTABLE),
    "2.5.4.4": ("surName", DIRECTORY),
    "2.5.4.43": ("initials", DIRECTORY),
    "2.5.4.44": ("generationQualifier", DIRECTORY),
    "2.5.4.42": ("givenName", DIRECTORY),
    "2.5.4.65": ("pseudonym", DIRECTORY),
    "2.5.4.46": ("dnQualifier", PRINTABLE),
    "2.5.4.17": ("postalCode", DIRECTORY),
    "2.5.4.41": ("name", DIRECTORY),
    "2.5.4.15": ("businessCategory", DIRECTORY),
    "0.9.2342.19200300.100.1.25": ("DC", IA5),
    "0.9.2342.19200300.100.1.1": ("UID", DIRECTORY),
    "1.2.840.113556.1.4.656": ("userPrincipalName", DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.1": ("jurisdictionOfIncorporationLocalityName", DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.2": ("jurisdictionOfIncorporationStateOrProvinceName", DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.3": ("jurisdictionOfIncorporationCountryName", PRINTABLE),
    "1.2.840.113549.1.9.1": ("EMAIL", IA5),
    "1.2.840.113549.1.9.20": (None, BMP),
    "1.2.840.113549.1.9.21": (None, OCTET),
    "1.2.840.113549.1.9.4": (None, OCTET),
    "1.3.6.1.5.5.7.8.5": ("XmppAddr", UTF8),
    "1.2.643.100.1": ("OGRN", NUMERIC),
    "1.2.643.100.3": ("SNILS", NUMERIC),
    "1.2.643.100.5": ("OGRNIP", NUMERIC),
    "1.2.643.3.131.1.1": ("INN", NUMERIC),
}
_ESCAPED = frozenset(',+"\\<>;')


class DNError(ValueError):
    """The certificate has no subject GnuTLS could print."""


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise DNError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise DNError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise DNError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, contents start, contents end) of each element in data[start:end]."""
    out = []
    while start < end:
        tag, c0, c1 = _tlv(data, start)
        out.append((tag, start, c0, c1))
        start = c1
    return out


def _oid(body: bytes) -> str:
    arcs, value = [], 0
    for b in body:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise DNError("empty OID")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _escape(text: str) -> str:
    """GnuTLS's str_escape() (RFC 4514's specials, '#' and spaces at the ends)."""
    out = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch == "\0":
            raise DNError("NUL in a name")
        if ch in _ESCAPED or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _hex(raw: bytes) -> str:
    return "#" + raw.hex()


def _is_print(raw: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in raw)


def _text(tag: int, body: bytes) -> str | None:
    """The printable text of a string of type `tag` (None: GnuTLS cannot decode it)."""
    if tag == BMP:
        if len(body) % 2:
            return None
        try:
            text = body.decode("utf-16-be")
        except UnicodeDecodeError:
            return None
    elif tag == TELETEX:
        # GnuTLS takes a Teletex string of ASCII printables as it is, else hex
        text = body.decode("ascii") if _is_print(body) else _hex(body)
    elif tag == UNIVERSAL:
        text = _hex(body)  # GnuTLS never decodes UCS-4
    else:
        text = body.decode("utf-8", errors="surrogateescape")
    return None if "\0" in text else text


def _value(oid: str, der: bytes) -> str:
    """One attribute value as GnuTLS prints it (_gnutls_x509_dn_to_string)."""
    known = _OIDS.get(oid)
    if known is not None:
        try:
            tag, c0, c1 = _tlv(der, 0)
        except DNError:
            tag, c0, c1 = -1, 0, 0
        expected = known[1]
        if c1 == len(der) and (tag in DIRECTORY_STRING if expected == DIRECTORY else tag == expected):
            text = _text(tag, der[c0:c1])
            if text is not None:
                return _escape(text)
    return _hex(der)  # unknown or undecodable: the whole DER, unescaped


def subject_dn(cert_der: bytes) -> str:
    """The subject of a DER certificate as gnutls_x509_crt_get_dn() prints it."""
    tag, c0, c1 = _tlv(cert_der, 0)
    if tag != SEQUENCE:
        raise DNError("not a certificate")
    tag, t0, t1 = _tlv(cert_der, c0)  # tbsCertificate
    if tag != SEQUENCE:
        raise DNError("not a certificate")
    fields = _children(cert_der, t0, t1)
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if len(fields) < 5 or fields[4][0] != SEQUENCE:
        raise DNError("no subject")
    _, _, s0, s1 = fields[4]
    rdns = _children(cert_der, s0, s1)
    if not rdns:
        raise DNError("empty subject")
    parts = []
    for rtag, _, r0, r1 in rdns:
        if rtag != SET:
            raise DNError("bad RDN")
        avas = []
        for atag, _, a0, a1 in _children(cert_der, r0, r1):
            if atag != SEQUENCE:
                raise DNError("bad attribute")
            inner = _children(cert_der, a0, a1)
            if len(inner) != 2 or inner[0][0] != OID_TAG:
                raise DNError("bad attribute")
            oid = _oid(cert_der[inner[0][2]:inner[0][3]])
            name = (_OIDS.get(oid) or (None, 0))[0] or oid
            avas.append(f"{name}={_value(oid, cert_der[inner[1][1]:inner[1][3]])}")
        parts.append("+".join(avas))
    return ",".join(parts)
