"""User-created objects as QEMU's QOM has them for object-add / object-del
and --object (qapi/qom.json): an id in one namespace per daemon, a type from
OBJECT_TYPES. exportd knows one type, tls-creds-x509 (exportd.tls).

The registry belongs to one daemon; `registry_of(daemon)` creates it on first
use (daemon.py does not know about objects). Users of an object (the NBD
server's tls-creds, the nbd driver's) look it up with `tls_creds()`, which
gives QEMU's texts, and keep what they took from it: as in QEMU, object-del
of credentials in use succeeds and the user goes on with its reference.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from exportd.aio.threads import in_own_thread
from exportd.errors import QMPError
from exportd.tls import TlsCredsX509, TlsError

LOAD_TIMEOUT_S = 30.0  # the credentials directory may sit on a hung mount

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class UserObject(Protocol):
    id: str
    qom_type: str

    def load(self) -> None:
        """Complete the object (blocking: runs in a thread); raise TlsError."""


OBJECT_TYPES: dict[str, Callable[[dict[str, Any]], UserObject]] = {
    "tls-creds-x509": TlsCredsX509.from_args,
}


class ObjectRegistry:
    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}

    async def add(self, args: dict[str, Any]) -> UserObject:
        """object-add with validated arguments: QEMU's checks in QEMU's order
        (id, properties, duplicate, then loading)."""
        oid = args["id"]
        if not _ID.match(oid):
            raise QMPError("Parameter 'id' expects an identifier")
        if "loaded" in args:
            raise QMPError(f"Property '{args['qom-type']}.loaded' is not writable")
        if oid in self.objects:
            raise QMPError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        obj = OBJECT_TYPES[args["qom-type"]](args)
        if "passwordid" in args:  # exportd has no secret objects
            raise QMPError(f"No secret with id '{args['passwordid']}'")
        self.objects[oid] = obj  # taken while loading: a second add of the id fails as duplicate
        try:
            await in_own_thread(obj.load, timeout=LOAD_TIMEOUT_S)
        except TlsError as e:
            del self.objects[oid]
            raise QMPError(str(e)) from None
        except OSError as e:  # the load's thread timed out (a hung mount)
            del self.objects[oid]
            raise QMPError(f"Unable to access credentials {args.get('dir')}: {e.strerror or e}") from None
        except BaseException:
            del self.objects[oid]
            raise
        return obj

    def delete(self, oid: str) -> None:
        if oid not in self.objects:
            raise QMPError(f"object '{oid}' not found")
        del self.objects[oid]

    def get(self, oid: str) -> UserObject | None:
        return self.objects.get(oid)


_REGISTRIES: weakref.WeakKeyDictionary[Any, ObjectRegistry] = weakref.WeakKeyDictionary()


def registry_of(daemon: Any) -> ObjectRegistry:
    """The daemon's object registry, created on first use."""
    reg = _REGISTRIES.get(daemon)
    if reg is None:
        reg = ObjectRegistry()
        _REGISTRIES[daemon] = reg
    return reg


def tls_creds(daemon: Any, oid: str, endpoint: str) -> TlsCredsX509:
    """The credentials `oid` for an `endpoint` ("server" or "client") user,
    QMPError with QEMU's texts otherwise (nbd-server-start tls-creds=...)."""
    obj = registry_of(daemon).get(oid)
    if obj is None:
        raise QMPError(f"No TLS credentials with id '{oid}'")
    if not isinstance(obj, TlsCredsX509):
        raise QMPError(f"Object with id '{oid}' is not TLS credentials")
    if obj.endpoint != endpoint:
        raise QMPError(f"Expected TLS credentials for a {endpoint} endpoint")
    return obj
