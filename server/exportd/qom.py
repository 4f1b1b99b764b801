"""The part of QEMU's QOM tree a storage daemon user sees through qom-list,
qom-get and qom-set: the container /objects and the user-created objects in
it (exportd.objects), with each type's properties as qemu-storage-daemon
7.2 lists them.

A path is absolute (`/objects`, `/objects/tg0`) or partial (an object's id);
anything else is not found (exportd has no other QOM objects: `/` and
`/chardevs` are not modelled). qom-set checks the value as object-add would
(the same schema, so the same texts), then applies it: a throttle group's
`limits` take effect at once, an iothread's numbers are kept; the other
writable properties are stored and, as in QEMU, change nothing already
loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exportd import authz
from exportd.block.throttle import LIMIT_KEYS, ThrottleGroup
from exportd.errors import DeviceNotFound, QMPError
from exportd.objects import IOThread, ObjectRegistry, UserObject
from exportd.secret import Secret
from exportd.tls import TlsCredsX509

ROOT = "/objects"
CONTAINER = "container"

# per type: property -> (QOM type name, getter); "type" comes first for all
Getter = Callable[[Any], Any]


def _str(attr: str) -> Getter:
    return lambda o: getattr(o, attr) or ""


PROPERTIES: dict[type, dict[str, tuple[str, Getter]]] = {
    IOThread: {name: ("int", (lambda o, n=name: o.get(n))) for name in IOThread.PARAMS},
    Secret: {"iv": ("string", _str("iv")), "keyid": ("string", _str("keyid")), "loaded": ("bool", lambda o: True),
             "format": ("QCryptoSecretFormat", lambda o: o.format), "file": ("string", _str("file")),
             "data": ("string", _str("data"))},
    ThrottleGroup: {"limits": ("ThrottleLimits", lambda o: o.get_limits()),
                    **{f"x-{k}": ("int", (lambda o, k=k: o.get_limits()[k])) for k in LIMIT_KEYS}},
    TlsCredsX509: {"endpoint": ("QCryptoTLSCredsEndpoint", lambda o: o.endpoint), "dir": ("string", _str("dir")),
                   "verify-peer": ("bool", lambda o: o.verify_peer), "priority": ("string", _str("priority")),
                   "sanity-check": ("bool", lambda o: o.sanity_check),
                   "passwordid": ("string", _str("passwordid")), "loaded": ("bool", lambda o: True)},
}
PROPERTIES.update(authz.QOM_PROPERTIES)
READ_ONLY = frozenset({"type", "loaded"})
# stored as given, without effect on a loaded object (QEMU's setters do the same)
STORED = {"dir": "dir", "priority": "priority", "passwordid": "passwordid", "verify-peer": "verify_peer",
          "sanity-check": "sanity_check", "endpoint": "endpoint", "data": "data", "file": "file",
          "format": "format", "keyid": "keyid", "iv": "iv"}


def _resolve(reg: ObjectRegistry, path: str) -> UserObject | str:
    """The object at `path`, or CONTAINER for /objects; DeviceNotFound else."""
    if reg.root_made and path in (ROOT, ROOT[1:]):
        return CONTAINER
    oid = path[len(ROOT) + 1:] if path.startswith(ROOT + "/") else None if path.startswith("/") else path
    obj = reg.get(oid) if oid else None
    if obj is None:
        raise DeviceNotFound(f"Device '{path}' not found")
    return obj


def qom_list(reg: ObjectRegistry, path: str) -> list[dict[str, str]]:
    node = _resolve(reg, path)
    props = [{"name": "type", "type": "string"}]
    if node == CONTAINER:
        return props + [{"name": oid, "type": f"child<{o.qom_type}>"} for oid, o in reg.objects.items()]
    return props + [{"name": n, "type": t} for n, (t, _) in PROPERTIES[type(node)].items()]


def qom_get(reg: ObjectRegistry, path: str, prop: str) -> Any:
    node = _resolve(reg, path)
    if node == CONTAINER:
        if prop == "type":
            return CONTAINER
        if prop in reg.objects:
            return f"{ROOT}/{prop}"
        raise QMPError(f"Property '{CONTAINER}.{prop}' not found")
    assert not isinstance(node, str)
    if prop == "type":
        return node.qom_type
    entry = PROPERTIES[type(node)].get(prop)
    if entry is None:
        raise QMPError(f"Property '{node.qom_type}.{prop}' not found")
    return entry[1](node)


def qom_set(reg: ObjectRegistry, schema: Any, path: str, prop: str, value: Any) -> None:
    """`schema` (exportd.qapi.schema.Schema) checks the value as object-add's."""
    node = _resolve(reg, path)
    qom_type = CONTAINER if node == CONTAINER else node.qom_type  # type: ignore[union-attr]
    if node == CONTAINER or (prop != "type" and prop not in PROPERTIES[type(node)]):
        raise QMPError(f"Property '{qom_type}.{prop}' not found")
    if prop in READ_ONLY:
        raise QMPError(f"Property '{qom_type}.{prop}' is not writable")
    value = schema.validate("object-add", {"qom-type": qom_type, "id": "x", prop: value})[prop]
    if isinstance(node, ThrottleGroup):
        if prop != "limits":
            raise QMPError("Property cannot be set after initialization")
        node.set_limits(value)
    elif isinstance(node, IOThread):
        node.set(prop, value)
    elif hasattr(node, "qom_set"):  # objects whose setters act live (authz)
        node.qom_set(prop, value)
    else:
        setattr(node, STORED[prop], value)
