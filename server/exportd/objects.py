"""User-created objects as QEMU's QOM has them for object-add / object-del
and --object (qapi/qom.json): an id in one namespace per daemon, a type from
the registry's `types`: tls-creds-x509 (exportd.tls), secret (exportd.secret),
throttle-group (exportd.block.throttle), authz-simple, authz-list and
authz-listfile (exportd.authz) and iothread (a name only: exportd
serves everything from one loop, but exports that name an iothread need it
to exist, as in QEMU).

The registry belongs to one daemon; `registry_of(daemon)` creates it on first
use (daemon.py does not know about objects). Users of an object (the NBD
server's tls-creds, the nbd driver's) look it up with `tls_creds()`, which
gives QEMU's texts, and keep what they took from it: as in QEMU, object-del
of credentials in use succeeds and the user goes on with its reference. A
throttle group with throttle nodes cannot be deleted (`in_use()`). An
object with a `close()` (an authz-listfile's inotify watch) is closed when
deleted.

object-add goes as QEMU's user_creatable_add_type(): the id's form, the
properties (each type's from_args checks them as QEMU's setters do), the
duplicate id, then completion (`load()`, in a thread: it may read files).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from exportd.aio.threads import in_own_thread
from exportd.authz import AUTHZ_TYPES, AuthzError
from exportd.block.throttle import ThrottleGroup
from exportd.errors import QMPError
from exportd.secret import Secret, SecretError
from exportd.tls import TlsCredsX509, TlsError

LOAD_TIMEOUT_S = 30.0  # the credentials directory may sit on a hung mount
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class ObjectError(Exception):
    """An object that cannot complete; str() is QEMU's text."""


class UserObject(Protocol):
    id: str
    qom_type: str

    def load(self) -> None:
        """Complete the object (blocking: runs in a thread); raise TlsError, SecretError or ObjectError."""


@dataclass
class IOThread:
    """An iothread object: its properties are kept, nothing runs (one loop serves all)."""

    id: str
    properties: dict[str, int]

    qom_type = "iothread"
    # the properties and QEMU's defaults (qom-get shows them)
    DEFAULTS = {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0, "aio-max-batch": 0,
                "thread-pool-min": 0, "thread-pool-max": 64}
    PARAMS = tuple(DEFAULTS)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> IOThread:
        props = {k: args[k] for k in cls.PARAMS if k in args}
        for k, v in props.items():
            if v < 0:
                raise QMPError(f"{k} value must be in range [0, {INT64_MAX}]")
        return cls(args["id"], props)

    def load(self) -> None:
        """QEMU checks the thread pool's bounds when the iothread starts."""
        low, high = self.get("thread-pool-min"), self.get("thread-pool-max")
        if low > high or not high or low > INT_MAX or high > INT_MAX:
            raise ObjectError("bad thread-pool-min/thread-pool-max values")

    def get(self, name: str) -> int:
        return self.properties.get(name, self.DEFAULTS[name])

    def set(self, name: str, value: int) -> None:
        """qom-set: QEMU keeps the value even when the pool's check then fails."""
        if value < 0:
            raise QMPError(f"{name} value must be in range [0, {INT64_MAX}]")
        self.properties[name] = value
        if name.startswith("thread-pool"):
            try:
                self.load()
            except ObjectError as e:
                raise QMPError(str(e)) from None


class ObjectRegistry:
    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}
        # QEMU makes its /objects container on the first object-add that gets
        # past the properties, or the first object-del (qom-list sees it after)
        self.root_made = False
        # qom-type -> the object from object-add's arguments (QEMU's property setters)
        self.types: dict[str, Callable[[dict[str, Any]], UserObject]] = {
            "iothread": IOThread.from_args,
            "secret": lambda args: Secret.from_args(args, self.secret_value),
            "throttle-group": ThrottleGroup.from_args,
            "tls-creds-x509": lambda args: TlsCredsX509.from_args(args, self.secret_text),
            **AUTHZ_TYPES,
        }

    async def add(self, args: dict[str, Any]) -> UserObject:
        """object-add with validated arguments: QEMU's checks in QEMU's order
        (id, properties, duplicate, then loading)."""
        oid = args["id"]
        if not _ID.match(oid):
            raise QMPError("Parameter 'id' expects an identifier")
        if "loaded" in args:
            raise QMPError(f"Property '{args['qom-type']}.loaded' is not writable")
        obj = self.types[args["qom-type"]](args)
        self.root_made = True
        if oid in self.objects:
            raise QMPError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        self.objects[oid] = obj  # taken while loading: a second add of the id fails as duplicate
        try:
            await in_own_thread(obj.load, timeout=LOAD_TIMEOUT_S)
        except (TlsError, SecretError, ObjectError, AuthzError) as e:
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
        self.root_made = True
        obj = self.objects.get(oid)
        if obj is None:
            raise QMPError(f"object '{oid}' not found")
        in_use = getattr(obj, "in_use", None)
        if in_use is not None and in_use():
            raise QMPError(f"object '{oid}' is in use, can not be deleted")
        del self.objects[oid]
        close = getattr(obj, "close", None)
        if close is not None:
            close()

    def get(self, oid: str) -> UserObject | None:
        return self.objects.get(oid)

    # --- secrets for their users (qcrypto_secret_lookup), from load() threads --------------
    def _secret(self, oid: str) -> Secret:
        obj = self.objects.get(oid)
        if obj is None:
            raise SecretError(f"No secret with id '{oid}'")
        if not isinstance(obj, Secret) or obj.value is None:
            raise SecretError(f"Object with id '{oid}' is not a secret")
        return obj

    def secret_value(self, oid: str) -> bytes:
        value = self._secret(oid).value
        assert value is not None
        return value

    def secret_text(self, oid: str) -> str:
        try:
            return self._secret(oid).as_utf8()
        except SecretError as e:
            raise TlsError(str(e)) from None


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


def iothread_exists(daemon: Any, oid: str) -> bool:
    """Whether `oid` names an iothread object (an export's `iothread`)."""
    return isinstance(registry_of(daemon).get(oid), IOThread)
