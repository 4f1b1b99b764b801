"""Decode/encode refcount blocks of any width (1..64 bits) to/from arrays of ints."""

from __future__ import annotations

import sys
from array import array
from itertools import chain

_WIDE_CODES = {8: "B", 16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}
_LITTLE = sys.byteorder == "little"


def _sub_byte_tables(bits: int) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    per = 8 // bits
    mask = (1 << bits) - 1
    # entry i of a byte sits at bit position i*bits (least significant first)
    dec = [tuple((b >> (i * bits)) & mask for i in range(per)) for b in range(256)]
    enc = {t: b for b, t in enumerate(dec)}
    return dec, enc


_SUB = {bits: _sub_byte_tables(bits) for bits in (1, 2, 4)}


def decode(data: bytes, bits: int) -> array:
    """A refcount block's bytes -> array of refcounts (typecode 'Q' for sub-byte widths)."""
    code = _WIDE_CODES.get(bits)
    if code:
        a = array(code, data)
        if _LITTLE and bits > 8:
            a.byteswap()
        return a
    dec = _SUB[bits][0]
    return array("B", chain.from_iterable(dec[b] for b in data))


def encode(values: array, bits: int) -> bytes:
    if bits in _WIDE_CODES:
        if _LITTLE and bits > 8:
            a = array(values.typecode, values)
            a.byteswap()
            return a.tobytes()
        return values.tobytes()
    per = 8 // bits
    enc = _SUB[bits][1]
    v = values.tolist()
    return bytes(enc[tuple(v[i : i + per])] for i in range(0, len(v), per))
