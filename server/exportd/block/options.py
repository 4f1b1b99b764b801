"""Reading blockdev options inside drivers, with QEMU's error texts.

The schema layer (exportd.qapi) validates QMP arguments first; drivers check
again with these helpers so that options reaching them any other way (the
--blockdev command line, nested dicts, tests) get the same clear errors.

`parse_blockdev_arg()` turns a --blockdev argument (QEMU's dotted key=value
syntax, or a JSON object) into blockdev-add arguments.
"""

from __future__ import annotations

import json
from typing import Any

from exportd.errors import BlockError

_MISSING = object()


def check_members(options: dict[str, Any], allowed: frozenset[str] | set[str], prefix: str = "") -> None:
    from exportd.block.graph import COMMON_MEMBERS

    for key in options:
        if key not in allowed and key not in COMMON_MEMBERS:
            raise BlockError(f"Parameter '{prefix}{key}' is unexpected")


def get_str(options: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = options.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise BlockError(f"Parameter '{key}' is missing")
        return default
    if not isinstance(value, str):
        raise BlockError(f"Invalid parameter type for '{key}', expected: string")
    return value


def get_int(options: dict[str, Any], key: str, default: Any = _MISSING, *, minimum: int = 0) -> Any:
    value = options.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise BlockError(f"Parameter '{key}' is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockError(f"Invalid parameter type for '{key}', expected: integer")
    if value < minimum or value >= 1 << 64:
        raise BlockError(f"Parameter '{key}' expects a value between {minimum} and {(1 << 63) - 1}"
                         if value < minimum else f"Parameter '{key}' is out of range")
    return value


def get_bool(options: dict[str, Any], key: str, default: bool = False) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise BlockError(f"Invalid parameter type for '{key}', expected: boolean")
    return value


def get_enum(options: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str):
        raise BlockError(f"Invalid parameter type for '{key}', expected: string")
    if value not in choices:
        raise BlockError(f"Parameter '{key}' does not accept value '{value}'")
    return value


# --- command line -------------------------------------------------------------

# Members whose command-line string is converted to another JSON type; the
# rest stay strings. Covers the drivers in this package and qcow2's common ones.
_BOOL_KEYS = {
    "read-only", "auto-read-only", "force-share", "cache.direct", "cache.no-flush",
    "read-zeroes", "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
    "pass-discard-other", "drop-cache", "x-check-cache-dropped",
}
_INT_KEYS = {
    "size", "offset", "latency-ns", "l2-cache-size", "l2-cache-entry-size",
    "refcount-cache-size", "cache-clean-interval", "aio-max-batch",
}
_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def _convert(path: str, value: str) -> Any:
    leaf = path.rsplit(".", 1)[-1]
    if path in _BOOL_KEYS or leaf in _BOOL_KEYS or path.endswith("cache.direct") or path.endswith("cache.no-flush"):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise BlockError(f"Parameter '{path}' expects 'on' or 'off'")
    if leaf in _INT_KEYS:
        try:
            return _parse_size(value)
        except ValueError:
            raise BlockError(f"Parameter '{path}' expects a non-negative number below 2^64") from None
    if value == "null" and leaf == "backing":
        return None
    return value


def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    t = text.strip().lower()
    num = t.rstrip("bkmgtp") if t and t[-1] in "kmgtp" else t
    unit = t[len(num):]
    if not num.isdigit() and not (num.startswith("0x") and len(num) > 2):
        raise ValueError(text)
    return int(num, 0) * units[unit]


def parse_blockdev_arg(text: str) -> dict[str, Any]:
    """`driver=file,node-name=f,filename=x.img,cache.direct=on` or a JSON object
    -> blockdev-add arguments. Commas inside values are written `,,` (QEMU)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise BlockError(f"Invalid JSON in --blockdev: {e}") from None
        if not isinstance(value, dict):
            raise BlockError("--blockdev JSON must be an object")
        return value
    result: dict[str, Any] = {}
    for key, value in _split_keyval(text):
        if not key:
            raise BlockError(f"Invalid parameter '{text}'")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BlockError(f"Parameter '{key}' conflicts with '{part}'")
            node = child
        if parts[-1] in node:
            raise BlockError(f"Parameter '{key}' appears more than once")
        node[parts[-1]] = _convert(key, value)
    return result


def _split_keyval(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        comma = text.find(",", i)
        if eq < 0 or (0 <= comma < eq):
            raise BlockError(f"Expected '=' after parameter '{text[i:comma if comma >= 0 else n]}'")
        key = text[i:eq]
        j = eq + 1
        value = []
        while j < n:
            if text[j] == ",":
                if j + 1 < n and text[j + 1] == ",":
                    value.append(",")
                    j += 2
                    continue
                break
            value.append(text[j])
            j += 1
        pairs.append((key, "".join(value)))
        i = j + 1
    return pairs
