"""BlockNode: the interface every block driver implements (cf. QEMU's BlockDriver).

All offsets and lengths are in bytes. I/O methods are coroutines that run on
the daemon's one asyncio loop; a driver keeps blocking system calls off the
loop when they can really block (see exportd.block.file). I/O failures are
raised as OSError(errno); open/attach failures as exportd.errors.BlockError
with QEMU's message text.

Permissions follow QEMU's model in small: each user of a node (a parent node
or an export) attaches with the permissions it needs (`perm`) and the ones it
lets other users hold at the same time (`shared`). Attaching fails with a
BlockError when the new user's perm conflicts with what an existing user does
not share, or the other way round. Drivers that sit on a file propagate the
union of their users' needs to the file (and its OFD locks).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


class Perm(enum.IntFlag):
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08
    ALL = 0x0F


class Prealloc(enum.StrEnum):
    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


class Status(enum.IntFlag):
    """block_status answer bits, as QEMU's BDRV_BLOCK_*."""

    DATA = 0x01  # reads return the node's data (not known zero)
    ZERO = 0x02  # reads return zeroes
    ALLOCATED = 0x04  # allocated in this node (not from a backing node)
    EOF = 0x20  # the answer reaches the end of the node


@dataclass(frozen=True)
class BlockStatus:
    status: Status
    length: int  # how many bytes from the asked offset this answer covers (> 0)


@dataclass
class NodeUser:
    """One holder of a node: a parent node (with its child role) or an export."""

    owner: object
    perm: Perm
    shared: Perm
    role: str = ""


class BlockNode(ABC):
    """One node of the block graph."""

    driver: ClassVar[str]  # QAPI driver name: "file", "raw", "qcow2", ...
    is_format: ClassVar[bool] = False  # format drivers (raw, qcow2) sit on a file child

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        self.node_name = node_name
        self.read_only = read_only
        self.auto_named = node_name.startswith("#")
        self.children: dict[str, BlockNode] = {}  # role ("file", "backing") -> child
        self.users: list[NodeUser] = []
        self.request_alignment = 1  # smallest I/O unit the node wants (blksize hint)
        # Filled in by the graph: the NodeUser this node holds on each child
        # (same keys as `children`), the options it was opened with, and
        # whether the monitor owns it (blockdev-add) or a parent does (#blockNNN).
        self.child_users: dict[str, NodeUser] = {}
        self.options: dict[str, Any] = {}
        self.monitor_owned = False
        self.cache_direct = False
        self.cache_no_flush = False
        self.force_share = False

    # --- life cycle -----------------------------------------------------
    @classmethod
    @abstractmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> BlockNode:
        """Open a node from validated blockdev-add options (driver-specific members,
        plus the common ones: read-only, cache, discard, ...). Children given as a
        node name or nested dict are resolved with graph.open_child()."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources; the graph detaches children afterwards."""

    # --- permissions ------------------------------------------------------
    def attach(self, owner: object, perm: Perm, shared: Perm, role: str = "") -> NodeUser:
        """Add a user; raises BlockError (and changes nothing) on a conflict with
        another user, a read-only node, or what lower layers (file locks) refuse."""
        from exportd.errors import BlockError

        if perm & (Perm.WRITE | Perm.RESIZE) and self.read_only:
            raise BlockError("Block node is read-only")
        for u in self.users:
            clash = (perm & ~u.shared) | (u.perm & ~shared)
            if clash:
                raise BlockError(
                    f"Conflicts with use by {describe_owner(u.owner)} as '{u.role or 'root'}', "
                    f"which {'does not allow' if perm & ~u.shared else 'uses'} "
                    f"'{perm_name(clash)}' on {self.node_name}"
                )
        user = NodeUser(owner, perm, shared, role)
        self._commit_users([*self.users, user])
        return user

    def update(self, user: NodeUser, perm: Perm, shared: Perm) -> None:
        """Change one user's permissions (e.g. take RESIZE for one truncate).
        Raises BlockError and leaves the old permissions on a conflict."""
        from exportd.errors import BlockError

        if perm & (Perm.WRITE | Perm.RESIZE) and self.read_only:
            raise BlockError("Block node is read-only")
        for u in self.users:
            if u is user:
                continue
            clash = (perm & ~u.shared) | (u.perm & ~shared)
            if clash:
                raise BlockError(
                    f"Conflicts with use by {describe_owner(u.owner)}: '{perm_name(clash)}' on {self.node_name}"
                )
        old = (user.perm, user.shared)
        user.perm, user.shared = perm, shared
        try:
            self._commit_users(self.users)
        except BaseException:
            user.perm, user.shared = old
            raise

    def detach(self, user: NodeUser) -> None:
        remaining = [u for u in self.users if u is not user]
        try:
            self._commit_users(remaining)
        except Exception:  # giving up permissions cannot fail; keep going
            self.users = remaining
            self.permissions_changed()

    def _commit_users(self, users: list[NodeUser]) -> None:
        perm, shared = Perm(0), Perm.ALL
        for u in users:
            perm |= u.perm
            shared &= u.shared
        self.apply_permissions(perm, shared)  # may raise: then nothing changed
        self.users = users
        self.permissions_changed()

    def apply_permissions(self, perm: Perm, shared: Perm) -> None:  # noqa: B027 (optional hook)
        """Hook, called before a change of users takes effect, with the combined
        (perm, shared) the users would then hold. A node passes what it needs on
        to its children (raw forwards them; file takes OFD locks) and raises
        BlockError, leaving everything as it was, when that is refused."""

    def permissions_changed(self) -> None:  # noqa: B027 (optional hook)
        """Hook: called after the users changed (no failure possible here)."""

    def check_resize_allowed(self) -> None:
        """Drivers call this in truncate(): a node that has users can only be
        resized while one of them holds Perm.RESIZE (as QEMU asserts)."""
        if self.users and not self.combined_perm()[0] & Perm.RESIZE:
            import errno

            raise OSError(errno.EPERM, f"resizing node '{self.node_name}' needs the resize permission")

    @property
    def refcount(self) -> int:
        return len(self.users)

    def combined_perm(self) -> tuple[Perm, Perm]:
        """(union of users' perm, intersection of users' shared)."""
        perm, shared = Perm(0), Perm.ALL
        for u in self.users:
            perm |= u.perm
            shared &= u.shared
        return perm, shared

    # --- I/O ------------------------------------------------------------
    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly `length` bytes (the caller clamps to getlength())."""

    @abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.write(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:  # noqa: B027 (optional hook)
        """Advisory: may do nothing. Reads afterwards return old data or zeroes."""

    async def flush(self) -> None:  # noqa: B027 (optional hook)
        """Make completed writes durable."""

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        raise OSError(95, "truncate not supported")  # EOPNOTSUPP

    @abstractmethod
    def getlength(self) -> int:
        """Current virtual size in bytes; cheap, no I/O."""

    async def allocated_size(self) -> int:
        """Host bytes used by this node and its file children (-1 if unknown)."""
        return -1

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """Status of [offset, offset+length) from offset on; default: all data."""
        end = self.getlength()
        n = max(0, min(length, end - offset))
        st = Status.DATA | Status.ALLOCATED
        if offset + n >= end:
            st |= Status.EOF
        return BlockStatus(st, n)

    # --- introspection (query-named-block-nodes) ---------------------------
    def filename(self) -> str:
        """The image file name as QEMU shows it (file child's name for formats)."""
        f = self.children.get("file")
        return f.filename() if f else ""

    def host_fd(self) -> int | None:
        """A descriptor of a plain host file whose bytes are exactly this node's
        contents (same offsets, same length), or None. Lets an export hand the
        data path to the kernel (FUSE passthrough). The node owns the fd."""
        return None

    def info(self) -> dict[str, Any]:
        """Driver-specific extra members for query-named-block-nodes' `image`."""
        return {}


def perm_name(p: Perm) -> str:
    names = {
        Perm.CONSISTENT_READ: "consistent read",
        Perm.WRITE: "write",
        Perm.WRITE_UNCHANGED: "write unchanged",
        Perm.RESIZE: "resize",
    }
    return ", ".join(n for bit, n in names.items() if p & bit)


def describe_owner(owner: object) -> str:
    d = getattr(owner, "describe", None)
    return d() if callable(d) else type(owner).__name__
