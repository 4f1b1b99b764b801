"""QEMU's keyval syntax for command-line options (`--blockdev`, `--chardev`, ...).

    driver=qcow2,node-name=disk,file.driver=file,file.filename=a,,b.img

Pairs are separated by ',', a literal comma in a value is written ',,'.
Dotted keys build nested objects; an object whose keys are all 0, 1, 2, ...
becomes a list (`enable.0=x,enable.1=y`). An `implied_key` names the value
of a first element written without `key=` (`socket,id=m` with implied key
`backend`). Every value is a string: coerce() turns them into the types the
schema asks for, as QEMU's keyval visitor does (sizes take QEMU's suffixes:
parse_size).

A value that starts with '{' is not keyval but JSON (parse_option), read by
the monitor's JSON parser so that it accepts exactly what QMP accepts.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exportd.qapi.schema import Schema

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
    that still need coerce().
    """
    if text.lstrip().startswith("{"):
        # imported here: plain keyval (every --chardev, --monitor) does without it
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


# --- typing by the schema -------------------------------------------------------
def coerce(schema: Schema, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Turn keyval strings into the JSON types the command's schema expects.

    `--blockdev driver=null-co,size=1G,read-zeroes=on` gives only strings;
    QEMU's keyval visitor converts them by the schema, and so does this.
    What cannot be converted stays a string, for Schema.validate to report.
    """
    doc = schema.commands.get(command)
    if doc is None:
        return args
    return _coerce(schema, doc, args)


def _coerce(schema: Schema, node: dict[str, Any], value: Any) -> Any:
    node = schema.resolve(node)
    if "anyOf" in node:
        for option in node["anyOf"]:
            opt = schema.resolve(option)
            t = opt.get("type")
            if isinstance(value, dict) and t == "object":
                return _coerce(schema, opt, value)
            if isinstance(value, list) and t == "array":
                return _coerce(schema, opt, value)
        if isinstance(value, str) and value in ("", "null"):
            if any(schema.resolve(o).get("type") == "null" for o in node["anyOf"]):
                return None
        return value
    t = node.get("type")
    if isinstance(value, dict):
        branch = schema.branch(node, value)
        members = schema.members(branch if branch is not None else node)
        return {k: _coerce(schema, members[k], v) if k in members else v for k, v in value.items()}
    if isinstance(value, list):
        items = node.get("items")
        return [_coerce(schema, items, v) for v in value] if isinstance(items, dict) else value
    if not isinstance(value, str):
        return value
    if t == "integer":
        # sizes take suffixes (1G); plain integers too, for convenience
        parsed = _parse_int(value)
        if parsed is None:
            parsed = parse_size(value)
        return value if parsed is None else parsed
    if t == "boolean":
        return {"on": True, "yes": True, "true": True, "y": True,
                "off": False, "no": False, "false": False, "n": False}.get(value, value)
    if t == "number":
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int | None:
    """QEMU's size syntax: 512, 64K, 1.5G, 1T (binary units), 0x200."""
    s = text.strip()
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)\s*([bBkKmMgGtTpPeE]?)", s)
    if not m:
        return None
    number, suffix = m.groups()
    unit = _SIZE_SUFFIX[suffix.lower()]
    if number.lower().startswith("0x"):
        if suffix:
            return None
        return int(number, 16)
    if "." in number:
        if unit == 1:
            return None
        value = int(float(number) * unit)
    else:
        value = int(number) * unit
    return value if value < 1 << 64 else None
