"""Authorization objects as QEMU's (authz/simple.c, authz/list.c,
authz/listfile.c, qapi/authz.json): created with object-add / --object,
asked by id whether an identity may go on. The NBD server's tls-authz asks
about the client certificate's distinguished name (exportd.x509dn).

- authz-simple: one identity, compared exactly.
- authz-list: rules in order ({match, policy, format exact|glob}); the
  first rule that matches decides, else the list's policy (default deny).
  A glob is GLib's g_pattern_match_simple(): '*' any string, '?' any one
  character, nothing else special.
- authz-listfile: an authz-list read from a JSON file ({"policy": ...,
  "rules": [...]}). With refresh (default on, as QEMU on Linux) the file's
  directory is watched with inotify, as QEMU does; exportd reads the file
  again when the next identity is checked after a change (QEMU reads it when
  the event arrives: the answers are the same). A file that no longer
  parses denies everyone until it is fixed, as in QEMU.

is_allowed_by_id() is QEMU's qauthz_is_allowed_by_id(): the object is
looked up at each check, so a missing id, or one naming another kind of
object, refuses with QEMU's texts (AuthzError).

authz-pam is not provided: it needs a PAM binding for Python, and none is
installed (qemu-storage-daemon 7.2 from Debian lacks it, and authz-listfile,
too: `invalid object type`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.monitor.jsonstream import JsonStream, ParseError

log = logging.getLogger(__name__)

POLICIES = ("deny", "allow")
FORMATS = ("exact", "glob")
RELOAD_TIMEOUT_S = 30.0  # the file may sit on a hung mount


class AuthzError(Exception):
    """A check or a load that failed; str() is QEMU's text."""


# --- rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    match: str
    policy: str
    format: str | None = None  # QEMU keeps "not given" apart (qom-get shows it so)

    def matches(self, identity: str) -> bool:
        if self.format == "glob":
            return _glob(self.match).fullmatch(identity) is not None
        return self.match == identity

    def as_dict(self) -> dict[str, str]:
        d = {"match": self.match, "policy": self.policy}
        if self.format is not None:
            d["format"] = self.format
        return d


_GLOBS: dict[str, re.Pattern[str]] = {}


def _glob(pattern: str) -> re.Pattern[str]:
    """g_pattern_match_simple() as a regular expression."""
    rx = _GLOBS.get(pattern)
    if rx is None:
        rx = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                        re.DOTALL)
        if len(_GLOBS) < 1024:
            _GLOBS[pattern] = rx
    return rx


def decide(rules: list[Rule], policy: str, identity: str) -> bool:
    for rule in rules:
        if rule.matches(identity):
            return rule.policy == "allow"
    return policy == "allow"


# --- the objects -----------------------------------------------------------------------
@dataclass
class AuthzSimple:
    id: str
    identity: str

    qom_type = "authz-simple"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AuthzSimple:
        return cls(args["id"], args["identity"])  # the schema requires identity

    def load(self) -> None:
        pass

    async def is_allowed(self, identity: str) -> bool:
        return identity == self.identity

    def qom_set(self, prop: str, value: Any) -> None:
        """qom-set of a property (validated as object-add's): live, as QEMU's setter."""
        self.identity = value


@dataclass
class AuthzList:
    id: str
    policy: str = "deny"  # QEMU's zeroed enum: the first value
    rules: list[Rule] = field(default_factory=list)

    qom_type = "authz-list"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AuthzList:
        return cls(args["id"], args.get("policy", "deny"),
                   [Rule(r["match"], r["policy"], r.get("format")) for r in args.get("rules", [])])

    def load(self) -> None:
        pass

    async def is_allowed(self, identity: str) -> bool:
        return decide(self.rules, self.policy, identity)

    def qom_set(self, prop: str, value: Any) -> None:
        """qom-set of policy or rules (validated as object-add's): live, as QEMU's setters."""
        if prop == "policy":
            self.policy = value
        else:
            self.rules = [Rule(r["match"], r["policy"], r.get("format")) for r in value]


@dataclass
class AuthzListFile:
    id: str
    filename: str
    refresh: bool = True
    list: AuthzList | None = field(default=None, repr=False)
    _watch: _Watch | None = field(default=None, repr=False)
    # a check that comes while the file is read again waits for the new list
    _reading: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    qom_type = "authz-listfile"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AuthzListFile:
        return cls(args["id"], args["filename"], args.get("refresh", True))

    def load(self) -> None:
        """QEMU's qauthz_list_file_complete() (blocking: runs in a thread)."""
        self.list = read_list_file(self.filename)
        if not self.refresh:
            return
        directory, base = os.path.dirname(self.filename), os.path.basename(self.filename)
        # g_path_get_dirname() / g_path_get_basename() say "." for these
        if directory in ("", "."):
            raise AuthzError("Filename must be an absolute path")
        if base in ("", "."):
            raise AuthzError("Path has no trailing filename component")
        self._watch = _Watch(directory, base)

    async def is_allowed(self, identity: str) -> bool:
        async with self._reading:
            if self._watch is not None and self._watch.changed():
                try:
                    self.list = await in_own_thread(read_list_file, self.filename, timeout=RELOAD_TIMEOUT_S)
                except (AuthzError, OSError) as e:
                    self.list = None  # as QEMU: denied until the file reads again
                    log.error("authz-listfile '%s': %s", self.id, e)
        if self.list is None:
            return False
        return decide(self.list.rules, self.list.policy, identity)

    def qom_set(self, prop: str, value: Any) -> None:
        """qom-set: QEMU's setters only store the value; the loaded list and
        the watch stay as they are."""
        setattr(self, prop, value)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


AUTHZ_TYPES: dict[str, Any] = {
    "authz-simple": AuthzSimple.from_args,
    "authz-list": AuthzList.from_args,
    "authz-listfile": AuthzListFile.from_args,
}

# qom-list / qom-get rows (exportd.qom's PROPERTIES format: name -> (QOM type, getter)),
# as qemu-storage-daemon 7.2 lists them; qom-set goes to each object's qom_set()
QOM_PROPERTIES: dict[type, dict[str, tuple[str, Any]]] = {
    AuthzSimple: {"identity": ("string", lambda o: o.identity)},
    AuthzList: {"policy": ("QAuthZListPolicy", lambda o: o.policy),
                "rules": ("QAuthZListRule", lambda o: [r.as_dict() for r in o.rules])},
    AuthzListFile: {"filename": ("string", lambda o: o.filename), "refresh": ("bool", lambda o: o.refresh)},
}


async def is_allowed_by_id(objects: dict[str, Any], authz_id: str, identity: str) -> bool:
    """QEMU's qauthz_is_allowed_by_id() over a daemon's objects (id -> object)."""
    obj = objects.get(authz_id)
    if obj is None:
        raise AuthzError(f"Cannot find QAuthZ object ID {authz_id}")
    if not isinstance(obj, AuthzSimple | AuthzList | AuthzListFile):
        raise AuthzError(f"Object '{authz_id}' is not a QAuthZ subclass")
    return await obj.is_allowed(identity)


# --- the list file ---------------------------------------------------------------------
def read_list_file(filename: str) -> AuthzList:
    """QEMU's qauthz_list_file_load(): the file as an authz-list's properties."""
    try:
        with open(filename, "rb") as f:
            content = f.read()
    except OSError as e:
        # g_file_get_contents()'s texts
        what = "Failed to open file" if not isinstance(e, IsADirectoryError) else "Error reading file"
        raise AuthzError(f"Unable to read '{filename}': {what} \u201c{filename}\u201d: "
                         f"{os.strerror(e.errno or errno.EIO)}") from None
    value = _one_json_value(content)
    if not isinstance(value, dict):
        raise AuthzError(f"File '{filename}' must contain a JSON object")
    return AuthzList("", *_list_properties(value))


def _one_json_value(content: bytes) -> Any:
    """qobject_from_json(): exactly one value, with QEMU's texts."""
    stream = JsonStream()
    items = stream.feed(content) + stream.feed(b" ")  # the space ends a trailing number or keyword
    if not items:
        if content.strip(b" \t\r\n"):
            raise AuthzError("JSON parse error, premature EOF")
        raise AuthzError("Expecting a JSON value")
    if isinstance(items[0], ParseError):
        raise AuthzError(items[0].desc)
    if len(items) > 1:
        raise AuthzError("Expecting at most one JSON value")
    return items[0]


def _list_properties(props: dict[str, Any]) -> tuple[str, list[Rule]]:
    """The file's dict set as authz-list properties (QEMU's setters and
    visitors, their texts)."""
    for key in props:
        if key not in ("policy", "rules"):
            raise AuthzError(f"Property 'authz-list.{key}' not found")
    policy = props.get("policy", "deny")
    if "policy" in props:
        policy = _enum(props["policy"], "policy", POLICIES)
    rules = []
    if "rules" in props:
        value = props["rules"]
        if not isinstance(value, list):
            raise AuthzError("Invalid parameter type for 'rules', expected: array")
        for i, r in enumerate(value):
            where = f"rules[{i}]"
            if not isinstance(r, dict):
                raise AuthzError(f"Invalid parameter type for '{where}', expected: object")
            for key in ("match", "policy"):
                if key not in r:
                    raise AuthzError(f"Parameter '{where}.{key}' is missing")
            if not isinstance(r["match"], str):
                raise AuthzError(f"Invalid parameter type for '{where}.match', expected: string")
            rpolicy = _enum(r["policy"], "policy", POLICIES, f"{where}.policy")
            rformat = _enum(r["format"], "format", FORMATS, f"{where}.format") if "format" in r else None
            for key in r:
                if key not in ("match", "policy", "format"):
                    raise AuthzError(f"Parameter '{where}.{key}' is unexpected")
            rules.append(Rule(r["match"], rpolicy, rformat))
    return policy, rules


def _enum(value: Any, name: str, allowed: tuple[str, ...], path: str | None = None) -> str:
    # QEMU 7.2 names an enum member without its path in the value error
    if not isinstance(value, str):
        raise AuthzError(f"Invalid parameter type for '{path or name}', expected: string")
    if value not in allowed:
        raise AuthzError(f"Parameter '{name}' does not accept value '{value}'")
    return value


# --- inotify ---------------------------------------------------------------------------
IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_Q_OVERFLOW = 0x2, 0x80, 0x100, 0x4000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name
_libc = ctypes.CDLL(None, use_errno=True)


class _Watch:
    """An inotify watch on a directory for one name's MODIFIED and CREATED
    events (QEMU's qemu_file_monitor on the file's directory). Nothing
    reads it until changed() is asked: the kernel queues the events."""

    def __init__(self, directory: str, name: str) -> None:
        self.name = name.encode()
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise AuthzError(f"Unable to initialize inotify: {os.strerror(ctypes.get_errno())}")
        if _libc.inotify_add_watch(fd, os.fsencode(directory), IN_MODIFY | IN_CREATE | IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise AuthzError(f"Unable to watch '{directory}': {os.strerror(err)}")
        self.fd: int | None = fd

    def changed(self) -> bool:
        """Whether the file changed since the last call (reads the queued events)."""
        if self.fd is None:
            return False
        changed = False
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return changed
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _, mask, _, length = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
                if mask & IN_Q_OVERFLOW or name == self.name:
                    changed = True
                pos += _EVENT.size + length

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

