"""Reading blockdev options inside drivers, with QEMU's error texts.

The schema layer (exportd.qapi) validates QMP arguments first; drivers check
again with these helpers so that options reaching them any other way (the
--blockdev command line, nested dicts, tests) get the same clear errors.

(The --blockdev command line is parsed by exportd.qapi.keyval and typed by the
schema layer before it reaches the graph.)
"""

from __future__ import annotations

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
    """An unsigned integer member (QEMU's uint64/size types)."""
    value = options.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise BlockError(f"Parameter '{key}' is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockError(f"Invalid parameter type for '{key}', expected: integer")
    if value < minimum or value >= 1 << 64:
        raise BlockError(f"Parameter '{key}' expects a non-negative number below 2^64")
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
