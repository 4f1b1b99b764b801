"""The QMP schema: loads schema/, validates arguments, speaks QEMU's error texts.

schema/commands/<name>.json describes the arguments of one command (a JSON
Schema, draft 2020-12; its `x-returns` describes the reply), schema/events/
<NAME>.json the data of one event, and schema/defs.json the shared types.
See schema/README.md for the conventions (`x-discriminator` unions,
`x-qapi-type` integer kinds, titles for alternates).

jsonschema does the checking; this module turns its findings into the one
message QEMU would give: `Parameter 'x' is missing`, `Invalid parameter type
for 'x', expected: string`, `Parameter 'x' does not accept value 'y'`,
`Parameter 'x' is unexpected`, with nested names dotted (`file.filename`)
and list items indexed (`enable[0]`). When several things are wrong, a
missing member is reported first, then a wrong type, then a wrong value, then
an unexpected member.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import jsonschema
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from exportd.errors import QMPError
from exportd.qapi.quickcheck import QuickCheck

BASE_URI = "https://exportd.invalid/schema/"

# jsonschema counts 1.0 as an integer; QMP does not (QEMU's parser keeps
# 1.0 and 1e3 as numbers), and booleans are never numbers.
_TYPE_CHECKER = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
    {
        "integer": lambda _c, v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda _c, v: isinstance(v, int | float) and not isinstance(v, bool),
    }
)
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_TYPE_CHECKER)

_RANK_MISSING, _RANK_TYPE, _RANK_VALUE, _RANK_UNEXPECTED, _RANK_OTHER = range(5)


def default_schema_dir() -> Path:
    env = os.environ.get("EXPORTD_SCHEMA_DIR")
    if env:
        return Path(env)
    # installed: exportd/schema inside the package; in the repository that
    # is a link to the root's schema/
    packaged = Path(__file__).resolve().parents[1] / "schema"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "schema"


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def param_name(path: Iterable[str | int]) -> str:
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name = f"{name}.{part}" if name else part
    return name


class Schema:
    """Every command and event schema of one schema/ directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.docs: dict[str, dict[str, Any]] = {}  # uri -> document
        self._doc_of: dict[int, str] = {}  # id(subschema dict) -> uri of its document
        self.commands: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        for path in sorted(directory.rglob("*.json")):
            rel = path.relative_to(directory).as_posix()
            uri = BASE_URI + rel
            doc = json.loads(path.read_text())
            doc.setdefault("$id", uri)
            self.docs[uri] = doc
            self._index(doc, uri)
            if rel.startswith("commands/"):
                self.commands[path.stem] = doc
            elif rel.startswith("events/"):
                self.events[path.stem] = doc
        self.registry: Registry = Registry().with_resources(
            (uri, DRAFT202012.create_resource(doc)) for uri, doc in self.docs.items()
        )
        self._validators: dict[str, Any] = {}
        self._quick = QuickCheck(self.resolve)

    def _index(self, node: Any, uri: str) -> None:
        if isinstance(node, dict):
            self._doc_of[id(node)] = uri
            for v in node.values():
                self._index(v, uri)
        elif isinstance(node, list):
            for v in node:
                self._index(v, uri)

    # --- references -----------------------------------------------------------
    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        """Follow $ref chains; the result is the schema that holds the members."""
        seen = 0
        while isinstance(node, dict) and "$ref" in node and seen < 64:
            base = self._doc_of.get(id(node), BASE_URI)
            url, fragment = urldefrag(urljoin(base, node["$ref"]))
            target: Any = self.docs[url]
            for part in fragment.split("/")[1:] if fragment else []:
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
            seen += 1
        return node

    def members(self, node: dict[str, Any]) -> dict[str, Any]:
        """Every member an object schema declares: its properties and its bases'."""
        node = self.resolve(node)
        props: dict[str, Any] = {}
        for base in node.get("allOf", ()):
            if "if" not in base:
                props.update(self.members(base))
        props.update(node.get("properties", {}))
        return props

    def branch(self, node: dict[str, Any], value: Any) -> dict[str, Any] | None:
        """For a discriminated union, the branch schema `value` selects."""
        node = self.resolve(node)
        tag = node.get("x-discriminator")
        if tag is None or not isinstance(value, dict):
            return None
        for case in node.get("allOf", ()):
            cond = case.get("if", {}).get("properties", {}).get(tag, {})
            if "const" in cond and cond["const"] == value.get(tag):
                return self.resolve(case["then"])
        return None

    # --- validation -----------------------------------------------------------
    def validator(self, kind: str, name: str) -> Any:
        key = f"{kind}/{name}"
        v = self._validators.get(key)
        if v is None:
            doc = (self.commands if kind == "commands" else self.events)[name]
            v = self._validators[key] = _Validator(doc, registry=self.registry)
        return v

    def validate(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Check a command's arguments; raise QMPError with QEMU's text if wrong."""
        if command not in self.commands:
            return args
        _check_depth(args)
        if self._quick.valid(self.commands[command], args):
            return args  # well-formed: no need for jsonschema's slower walk
        errors = list(self.validator("commands", command).iter_errors(args))
        if errors:
            raise QMPError(self.describe(errors))
        return args

    def validate_event(self, event: str, data: dict[str, Any]) -> None:
        errors = list(self.validator("events", event).iter_errors(data))
        if errors:
            raise QMPError(self.describe(errors))

    def check_returns(self, command: str, value: Any) -> None:
        """Check a reply against the command's x-returns (used by tests)."""
        returns = self.commands[command].get("x-returns")
        if returns is None:
            return
        doc = {"$id": BASE_URI + f"commands/{command}.json#returns", **returns}
        self._doc_of[id(doc)] = BASE_URI + f"commands/{command}.json"
        errors = list(_Validator(doc, registry=self.registry).iter_errors(value))
        if errors:
            raise QMPError(self.describe(errors))

    def describe(self, errors: list[ValidationError]) -> str:
        return self._best(errors)[1]

    def _best(self, errors: Iterable[ValidationError]) -> tuple[int, str]:
        found = [self._translate(e) for e in errors]
        return min(found, key=lambda t: t[0]) if found else (_RANK_OTHER, "Invalid parameters")

    def _translate(self, e: ValidationError) -> tuple[int, str]:
        path = list(e.absolute_path)
        kind = e.validator
        if kind == "required":
            present = e.instance if isinstance(e.instance, dict) else {}
            for member in e.validator_value:
                if member not in present:
                    return _RANK_MISSING, f"Parameter '{param_name([*path, member])}' is missing"
        if kind in ("additionalProperties", "unevaluatedProperties"):
            known = self.members(e.schema)
            patterns = [re.compile(p) for p in self.resolve(e.schema).get("patternProperties", {})]
            for member in e.instance:
                if member not in known and not any(p.search(member) for p in patterns):
                    return _RANK_UNEXPECTED, f"Parameter '{param_name([*path, member])}' is unexpected"
        if kind == "type":
            expected = e.validator_value
            if isinstance(expected, list):
                expected = e.schema.get("title") or "|".join(expected)
            return _RANK_TYPE, self._type_error(path, expected)
        if kind in ("enum", "const"):
            if not isinstance(e.instance, str):
                want = e.schema.get("type", "string")
                return _RANK_TYPE, self._type_error(path, want if isinstance(want, str) else "string")
            return _RANK_VALUE, f"Parameter '{param_name(path)}' does not accept value '{e.instance}'"
        if kind in ("anyOf", "oneOf"):
            return self._alternate(e, path)
        if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            qtype = e.schema.get("x-qapi-type", "int")
            return _RANK_VALUE, f"Parameter '{param_name(path)}' expects {_range_text(qtype, e.schema)}"
        name = param_name(path) or "arguments"
        return _RANK_OTHER, f"Parameter '{name}' is invalid: {e.message}"

    def _type_error(self, path: list[str | int], expected: str) -> str:
        return f"Invalid parameter type for '{param_name(path) or 'arguments'}', expected: {expected}"

    def _alternate(self, e: ValidationError, path: list[str | int]) -> tuple[int, str]:
        """An alternate (anyOf): report the errors of the branch whose type fits."""
        have = json_type(e.instance)
        for i, option in enumerate(e.validator_value):
            want = self.resolve(option).get("type")
            wants = want if isinstance(want, list) else [want]
            if have in wants or (have == "integer" and "number" in wants):
                inner = [c for c in e.context or () if c.relative_schema_path[0] == i]
                if inner:
                    return self._best(inner)
        title = e.schema.get("title") or "|".join(
            str(self.resolve(o).get("type", "value")) for o in e.validator_value
        )
        return _RANK_TYPE, self._type_error(path, title)


# Real arguments nest a few levels (a qcow2 over a file, a backing chain);
# validation time grows faster than linearly with depth, and it runs on the
# loop, so absurd nesting is refused before it is looked at.
MAX_ARGUMENT_DEPTH = 64


def _check_depth(args: Any) -> None:
    stack: list[tuple[Any, list[str | int]]] = [(args, [])]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_ARGUMENT_DEPTH:
            raise QMPError(
                f"Parameter '{param_name(path[:MAX_ARGUMENT_DEPTH])}' nests deeper than "
                f"{MAX_ARGUMENT_DEPTH} levels"
            )
        if isinstance(value, dict):
            stack.extend((v, [*path, k]) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(value))


def _range_text(qtype: str, schema: dict[str, Any]) -> str:
    if qtype == "size":
        return "a non-negative number below 2^64"
    if qtype == "uint64":
        return "uint64"
    if qtype == "uint32":
        return "uint32_t"  # QEMU's visit_type_uint32
    lo, hi = schema.get("minimum"), schema.get("maximum")
    return f"an integer in the range [{lo}, {hi}]"


@functools.cache
def schema() -> Schema:
    """The daemon's schema (loaded once)."""
    return Schema(default_schema_dir())
