"""query-qmp-schema: schema/ rendered in QEMU's introspection format.

QEMU's SchemaInfo list (qapi/introspect.json): one entry per command,
event and type, with meta-type command/event/object/enum/array/alternate/
builtin. Types that schema/defs.json names keep their names; anonymous ones
get QEMU-style names (q_obj_<command>-arg, q_empty). QEMU masks names as
numbers; exportd leaves them readable, which clients accept.

Only the commands and events the caller names are listed (query-qmp-schema
passes the implemented ones), with every type they reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from exportd.qapi.schema import Schema

_BUILTINS = {
    "str": "string",
    "int": "int",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}
_SCALARS = {"string": "str", "integer": "int", "number": "number", "boolean": "bool", "null": "null"}


class _Builder:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.entities: dict[str, dict[str, Any]] = {}

    def type_of(self, node: Any, hint: str) -> str:
        if not isinstance(node, dict) or not node:
            return self._builtin("any")
        name = hint
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = self.schema.resolve(node)
        if "anyOf" in node:
            return self._alternate(node, name)
        t = node.get("type")
        if t == "string" and "enum" in node:
            return self._enum(node, name)
        if t == "array":
            elem = self.type_of(node.get("items", {}), name + "-elem")
            arr = f"[{elem}]"
            self.entities.setdefault(arr, {"name": arr, "meta-type": "array", "element-type": elem})
            return arr
        if t == "object":
            return self._object(node, name)
        if isinstance(t, str) and t in _SCALARS:
            return self._builtin(_SCALARS[t])
        return self._builtin("any")

    def _builtin(self, name: str) -> str:
        self.entities.setdefault(name, {"name": name, "meta-type": "builtin", "json-type": _BUILTINS[name]})
        return name

    def _enum(self, node: dict[str, Any], name: str) -> str:
        values = list(node["enum"])
        self.entities.setdefault(
            name,
            {"name": name, "meta-type": "enum", "values": values, "members": [{"name": v} for v in values]},
        )
        return name

    def _alternate(self, node: dict[str, Any], name: str) -> str:
        if name in self.entities:
            return name
        entity: dict[str, Any] = {"name": name, "meta-type": "alternate", "members": []}
        self.entities[name] = entity
        entity["members"] = [{"type": self.type_of(o, f"{name}-{i}")} for i, o in enumerate(node["anyOf"])]
        return name

    def _members(self, props: dict[str, Any], required: Iterable[str], owner: str) -> list[dict[str, Any]]:
        req = set(required)
        out = []
        for key, sub in props.items():
            member: dict[str, Any] = {"name": key, "type": self.type_of(sub, f"{owner}-{key}")}
            if key not in req:
                member["default"] = None  # QEMU marks optional members this way
            out.append(member)
        return out

    def _object(self, node: dict[str, Any], name: str) -> str:
        if not node.get("properties") and not node.get("allOf"):
            name = "q_empty"
        if name in self.entities:
            return name
        entity: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
        self.entities[name] = entity
        tag = node.get("x-discriminator")
        if tag is not None:
            cases = [c for c in node.get("allOf", ()) if "if" in c]
            first = self.schema.resolve(cases[0]["then"]) if cases else {}
            base = self._base_props(first)
            required = self._base_required(first)
            entity["members"] = self._members(base, required, name)
            entity["tag"] = tag
            variants = []
            for case in cases:
                value = case["if"]["properties"][tag]["const"]
                branch_ref = case["then"]
                branch_name = branch_ref["$ref"].rsplit("/", 1)[-1] if "$ref" in branch_ref else f"{name}-{value}"
                branch = self.schema.resolve(branch_ref)
                if branch_name not in self.entities:
                    self.entities[branch_name] = {
                        "name": branch_name,
                        "meta-type": "object",
                        "members": [],
                    }
                    self.entities[branch_name]["members"] = self._members(
                        branch.get("properties", {}), branch.get("required", ()), branch_name
                    )
                variants.append({"case": value, "type": branch_name})
            entity["variants"] = variants
            return name
        props = self.schema.members(node)
        required = set(node.get("required", ())) | set(self._base_required(node))
        entity["members"] = self._members(props, required, name)
        return name

    def _base_props(self, branch: dict[str, Any]) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for base in branch.get("allOf", ()):
            if "if" not in base:
                props.update(self.schema.members(base))
        return props

    def _base_required(self, branch: dict[str, Any]) -> list[str]:
        req: list[str] = []
        for base in branch.get("allOf", ()):
            if "if" not in base:
                req += self.schema.resolve(base).get("required", [])
        return req


def schema_info(schema: Schema, commands: Iterable[str], events: Iterable[str]) -> list[dict[str, Any]]:
    """The SchemaInfo list of `commands` and `events`: query-qmp-schema's reply."""
    b = _Builder(schema)
    out: list[dict[str, Any]] = []
    for name in commands:
        doc = schema.commands.get(name)
        if doc is None:
            continue
        arg = b.type_of(doc, f"q_obj_{name}-arg")
        ret = b.type_of(doc.get("x-returns", {"type": "object"}), f"q_obj_{name}-ret")
        out.append({"name": name, "meta-type": "command", "arg-type": arg, "ret-type": ret})
    for name in events:
        doc = schema.events[name]
        arg = b.type_of(doc, f"q_obj_{name}-arg")
        out.append({"name": name, "meta-type": "event", "arg-type": arg})
    out.extend(b.entities.values())
    return out
