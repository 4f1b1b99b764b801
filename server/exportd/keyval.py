"""QEMU's keyval syntax for command-line options (`--blockdev`, `--chardev`, ...).

    driver=qcow2,node-name=disk,file.driver=file,file.filename=a,,b.img

Pairs are separated by ',', a literal comma in a value is written ',,'.
Dotted keys build nested objects; an object whose keys are all 0, 1, 2, ...
becomes a list (`enable.0=x,enable.1=y`). An `implied_key` names the value
of a first element written without `key=` (`socket,id=m` with implied key
`backend`). Every value is a string: exportd.qapi.Schema.coerce_keyval turns
them into the types the schema asks for, as QEMU's keyval visitor does.

A value that starts with '{' is not keyval but JSON (parse_option).
"""

from __future__ import annotations

import re
from typing import Any

_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z")


class KeyvalError(ValueError):
    pass


def _split(text: str) -> list[str]:
    """Split on single commas; ',,' is an escaped comma."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse keyval text into nested dicts (and lists) of strings."""
    root: dict[str, Any] = {}
    if text == "":
        return root
    for index, element in enumerate(_split(text)):
        if element == "" and index > 0:
            continue  # trailing comma, as QEMU allows
        key, eq, value = element.partition("=")
        if not eq:
            if index == 0 and implied_key is not None:
                key, value = implied_key, element
            elif element == "":
                raise KeyvalError("Invalid parameter ''")
            else:
                raise KeyvalError(f"Expected '=' after parameter '{element}'")
        if not _KEY_RE.match(key):
            raise KeyvalError(f"Invalid parameter '{key}'")
        _store(root, key.split("."), value, key)
    return _listify(root, "")


def _store(root: dict[str, Any], parts: list[str], value: str, full: str) -> None:
    cur = root
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        elif not isinstance(nxt, dict):
            raise KeyvalError(f"Parameters '{'.'.join(parts[: i + 1])}.*' used inconsistently")
        cur = nxt
    last = parts[-1]
    if isinstance(cur.get(last), dict):
        raise KeyvalError(f"Parameters '{full}.*' used inconsistently")
    cur[last] = value  # a repeated key: the last one wins, as in QEMU


def _listify(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v, f"{path}{k}.") for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        indices = sorted(int(k) for k in out)
        if indices != list(range(len(indices))):
            missing = next(i for i in range(len(indices) + 1) if i not in indices)
            raise KeyvalError(f"Parameter '{path}{missing}' missing")
        return [out[str(i)] for i in indices]
    return out


def parse_option(text: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """Parse a --blockdev/--export value; returns (arguments, is_keyval).

    JSON form values already carry their types; keyval values are strings
    that still need exportd.qapi coercion.
    """
    if text.lstrip().startswith("{"):
        from exportd.monitor.jsonstream import JsonStream, ParseError

        stream = JsonStream()
        items = stream.feed(text.encode())
        if len(items) != 1 or stream.feed(b" ") or not text.strip().endswith("}"):
            raise KeyvalError("Invalid JSON: expected exactly one object")
        (value,) = items
        if isinstance(value, ParseError):
            raise KeyvalError(value.desc)
        if not isinstance(value, dict):
            raise KeyvalError("Invalid JSON: expected an object")
        return value, False
    return parse(text, implied_key), True
