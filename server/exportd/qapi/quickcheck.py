"""A fast "yes" for well-formed command arguments (in front of jsonschema).

jsonschema evaluates `unevaluatedProperties` and if/then unions by walking
every subschema again for each member: about 180 us for one
block-export-add, a tenth of an export add+del cycle (bench/README.md,
Levers). This walker knows the keywords schema/ uses and answers True only
for arguments that are valid; for anything else (invalid arguments, or a
keyword it does not know) it answers False and the caller runs jsonschema,
whose errors carry QEMU's texts. So it can make validation faster, never
more lenient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Keywords that say nothing about validity.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$defs", "title", "description", "x-returns", "x-discriminator",
     "x-qapi-type", "x-allowed-in-negotiation", "default", "examples"}
)
_KNOWN = _ANNOTATIONS | {
    "$ref", "type", "enum", "const", "minimum", "maximum", "properties", "required",
    "additionalProperties", "unevaluatedProperties", "allOf", "anyOf", "if", "then",
    "else", "items",
}


class _Unsupported(Exception):
    """A schema construct this walker does not judge: let jsonschema do it."""


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return type(value) is dict
    if name == "string":
        return type(value) is str
    if name == "boolean":
        return type(value) is bool
    if name == "integer":
        return type(value) is int  # 1.0: left to jsonschema
    if name == "number":
        return type(value) in (int, float)
    if name == "array":
        return type(value) is list
    if name == "null":
        return value is None
    raise _Unsupported(name)


def _same(a: Any, b: Any) -> bool:
    """JSON equality for enum/const, where True is not 1."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    return a == b


class QuickCheck:
    """`valid(schema, value)`: True only when `value` satisfies `schema`.

    `resolve` follows a node's $ref (Schema.resolve: it knows which
    document each node came from).
    """

    def __init__(self, resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._resolve = resolve
        # id of a node with $ref -> its target; the schema's nodes live as
        # long as the Schema that owns this checker
        self._targets: dict[int, dict[str, Any]] = {}

    def valid(self, node: dict[str, Any], value: Any) -> bool:
        try:
            return self._evaluate(node, value, 0) is not None
        except (_Unsupported, RecursionError):
            return False

    def _evaluate(self, node: Any, value: Any, depth: int) -> set[str] | None:
        """The member names `node` evaluated on `value`, None when invalid."""
        if node is True:
            return set()
        if node is False:
            return None
        if type(node) is not dict or depth > 64:
            raise _Unsupported("schema node")
        unknown = node.keys() - _KNOWN
        if unknown:
            raise _Unsupported(", ".join(sorted(unknown)))
        seen: set[str] = set()
        if "$ref" in node:
            target = self._targets.get(id(node))
            if target is None:
                # the referenced schema (its siblings are checked below)
                target = self._targets[id(node)] = self._resolve(node)
            found = self._evaluate(target, value, depth + 1)
            if found is None:
                return None
            seen |= found
        if "type" in node:
            names = node["type"] if type(node["type"]) is list else [node["type"]]
            if not any(_is_type(value, n) for n in names):
                return None
        if "enum" in node and not any(_same(value, e) for e in node["enum"]):
            return None
        if "const" in node and not _same(value, node["const"]):
            return None
        if type(value) in (int, float) and type(value) is not bool:
            if "minimum" in node and value < node["minimum"]:
                return None
            if "maximum" in node and value > node["maximum"]:
                return None
        if type(value) is list and "items" in node:
            for item in value:
                if self._evaluate(node["items"], item, depth + 1) is None:
                    return None
        if type(value) is dict:
            found = self._members(node, value, depth)
            if found is None:
                return None
            seen |= found
        for sub in node.get("allOf", ()):
            found = self._evaluate(sub, value, depth + 1)
            if found is None:
                return None
            seen |= found
        if "anyOf" in node:
            matched = [self._evaluate(sub, value, depth + 1) for sub in node["anyOf"]]
            if all(m is None for m in matched):
                return None
            for m in matched:
                seen |= m or set()
        if "if" in node:
            cond = self._evaluate(node["if"], value, depth + 1)
            branch = node.get("then") if cond is not None else node.get("else")
            seen |= cond or set()
            if branch is not None:
                found = self._evaluate(branch, value, depth + 1)
                if found is None:
                    return None
                seen |= found
        if type(value) is dict and "unevaluatedProperties" in node:
            if node["unevaluatedProperties"] is not False:
                raise _Unsupported("unevaluatedProperties schema")
            if value.keys() - seen:
                return None
        return seen

    def _members(self, node: dict[str, Any], value: dict[str, Any], depth: int) -> set[str] | None:
        """properties, required and additionalProperties on an object."""
        for name in node.get("required", ()):
            if name not in value:
                return None
        props = node.get("properties", {})
        seen: set[str] = set()
        extra = node.get("additionalProperties", True)
        for key, member in value.items():
            sub = props.get(key)
            if sub is None:
                if extra is True:
                    continue
                sub = extra
            if self._evaluate(sub, member, depth + 1) is None:
                return None
            seen.add(key)
        return seen
