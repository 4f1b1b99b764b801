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
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from exportd.block.bitmaps import mark_written, node_resized
from exportd.block.write_threshold import check as threshold_check
from exportd.errors import BlockError
from exportd.extents import Extent

if TYPE_CHECKING:
    from exportd.block.bitmaps import DirtyBitmap


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


class Edge:
    """One parent's hold on a node (QEMU's BdrvChild): a format node over its
    `file` or `backing` child, an export over its root node, a job over the
    nodes it reads and writes. It carries the permissions the parent takes
    on the node (`perm`) and those it lets others take (`shared`).

    Parents reach their node only through the edge (`edge.node`), never by
    a reference of their own: replacing a node (BlockGraph.replace_node: a
    snapshot, a commit or mirror pivot) moves edges, and every parent then
    sits on the new node at once.
    """

    __slots__ = ("parent", "role", "node", "perm", "shared")

    def __init__(self, parent: object, role: str, node: BlockNode, perm: Perm, shared: Perm) -> None:
        self.parent = parent
        self.role = role
        self.node = node
        self.perm = perm
        self.shared = shared

    def __repr__(self) -> str:
        return f"<Edge {describe_owner(self.parent)} -{self.role or 'root'}-> {self.node.node_name}>"


class BlockNode(ABC):
    """One node of the block graph."""

    driver: ClassVar[str]  # QAPI driver name: "file", "raw", "qcow2", ...
    is_format: ClassVar[bool] = False  # format drivers (raw, qcow2) sit on a file child
    # blockdev-add members of this driver beyond the common ones (the graph
    # refuses any other with QEMU's "Parameter 'x' is unexpected" before open())
    option_members: ClassVar[frozenset[str]] = frozenset()
    supports_backing: ClassVar[bool] = False  # may have a `backing` child (an overlay can)
    # driver members blockdev-reopen may change on a live node (any other
    # change is refused with "Cannot change the option 'x'")
    reopen_members: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        self.node_name = node_name
        self.read_only = read_only
        self.auto_named = node_name.startswith("#")
        self.users: list[Edge] = []  # the edges of this node's parents
        self.child_edges: dict[str, Edge] = {}  # role ("file", "backing") -> edge to the child
        self.request_alignment = 1  # smallest I/O unit the node wants (blksize hint)
        # Filled in by the graph: the options it was opened with, and
        # whether the monitor owns it (blockdev-add) or a parent does (#blockNNN).
        self.options: dict[str, Any] = {}
        self.monitor_owned = False
        self.cache_direct = False
        self.cache_no_flush = False
        self.force_share = False
        self.dirty_bitmaps: list[DirtyBitmap] = []  # newest first (exportd.block.bitmaps)
        self.write_threshold = 0  # exportd.block.write_threshold (0: none)
        self.threshold_emit: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The synchronous data path must never bypass a driver's read() or
        # write(): a class that overrides either without declaring its own
        # map_now() inherits "always the slow way".
        super().__init_subclass__(**kwargs)
        # every write a driver takes marks the node's dirty bitmaps, whichever
        # path it came by (a driver cannot forget to)
        for name, wrap in _MARKING_WRAPPERS.items():
            if name in cls.__dict__:
                setattr(cls, name, wrap(cls.__dict__[name]))
        if "map_now" not in cls.__dict__ and ("read" in cls.__dict__ or "write" in cls.__dict__):
            cls.map_now = BlockNode.map_now  # type: ignore[method-assign]

    @property
    def children(self) -> dict[str, BlockNode]:
        """role -> child node, through the edges (a snapshot of them)."""
        return {role: e.node for role, e in self.child_edges.items()}

    def child(self, role: str) -> BlockNode | None:
        e = self.child_edges.get(role)
        return e.node if e is not None else None

    # --- the driver table (QEMU's BlockDriver) ----------------------------
    @classmethod
    def probe(cls, head: bytes) -> int:
        """How sure this driver is (0: not at all, 100: certain) that an
        image whose first bytes are `head` is in its format (exportd.block.probe_format)."""
        return 0

    @classmethod
    def create_steps(cls, graph: Any, options: dict[str, Any]) -> tuple[Any, Any] | None:
        """blockdev-create for this driver: (prepare, work), two coroutine
        functions taking the job (prepare runs inside the command, work in
        the background), or None when the driver cannot create images."""
        return None

    # --- life cycle -----------------------------------------------------
    @classmethod
    @abstractmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> BlockNode:
        """Open a node from validated blockdev-add options (driver-specific members,
        plus the common ones: read-only, cache, discard, ...). Children given as a
        node name or nested dict are resolved with graph.open_child()."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources; the graph detaches children afterwards."""

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """blockdev-reopen, first phase (exportd.block.reopen drives it): get
        ready to run with `options` (the full normalized set) and `read_only`,
        doing whatever may fail (open a new descriptor, check the image can
        be written, flush before going read-only) without changing what the
        node serves. Return (commit, abort): commit is an async callable that
        makes the new state current once every node and permission is ready
        and must not fail; abort undoes the preparation. None: nothing to do
        beyond the common members."""
        return None

    # --- permissions ------------------------------------------------------
    def attach(self, parent: object, perm: Perm, shared: Perm, role: str = "") -> Edge:
        """A new edge from `parent` to this node; raises BlockError (and changes
        nothing) on a conflict with another user, a read-only node, or what
        lower layers (file locks) refuse."""
        self.check_perm(perm, shared, (), parent, role)
        edge = Edge(parent, role, self, perm, shared)
        self._commit_users([*self.users, edge])
        return edge

    def check_perm(self, perm: Perm, shared: Perm, ignore: tuple[Edge, ...] | list[Edge],
                   parent: object = None, role: str = "") -> None:
        """Raise BlockError if a new user (`parent` as `role`) with (perm,
        shared) conflicts with the users of this node other than `ignore`."""
        from exportd.errors import BlockError

        if perm & (Perm.WRITE | Perm.RESIZE) and self.read_only:
            raise BlockError("Block node is read-only")
        for u in self.users:
            if u in ignore:
                continue
            if perm & ~u.shared:
                raise self._conflict(perm & ~u.shared, parent, role, u.parent, u.role)
            if u.perm & ~shared:
                raise self._conflict(u.perm & ~shared, u.parent, u.role, parent, role)

    def _conflict(self, clash: Perm, needs: object, needs_role: str, refuses: object, refuses_role: str) -> Exception:
        """QEMU's text for a permission conflict between two users of this node."""
        from exportd.errors import BlockError

        me = self.node_name
        return BlockError(
            f"Permission conflict on node '{me}': permissions '{perm_name(clash)}' are both required by "
            f"{describe_owner(needs)} (uses node '{me}' as '{needs_role or 'root'}' child) and unshared by "
            f"{describe_owner(refuses)} (uses node '{me}' as '{refuses_role or 'root'}' child)."
        )

    def update(self, edge: Edge, perm: Perm, shared: Perm) -> None:
        """Change one edge's permissions (e.g. take RESIZE for one truncate).
        Raises BlockError and leaves the old permissions on a conflict."""
        self.check_perm(perm, shared, (edge,), edge.parent, edge.role)
        old = (edge.perm, edge.shared)
        edge.perm, edge.shared = perm, shared
        try:
            self._commit_users(self.users)
        except BaseException:
            edge.perm, edge.shared = old
            raise

    def detach(self, *edges: Edge) -> None:
        """Drop these edges' permissions (their parents are done with the
        node, or have moved to another one)."""
        remaining = [u for u in self.users if u not in edges]
        try:
            self._commit_users(remaining)
        except Exception:  # giving up permissions cannot fail; keep going
            self.users = remaining
            self.permissions_changed()

    def _commit_users(self, users: list[Edge]) -> None:
        perm, shared = combine(users)
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
        return combine(self.users)

    # --- the synchronous data path ----------------------------------------
    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        """Where the bytes of [offset, offset + length) live, answered at once
        on the loop without I/O: extents (exportd.extents) covering the range
        in order, or None when the driver cannot say without waiting; the
        caller then awaits read() or write(). The range lies inside the node.

        With write=True the extents say where a write of the range may go in
        place, with exactly the effect write() (without FUA) would have: a
        driver answers only when no metadata changes (a qcow2 cluster that
        is already ours, a file inside its current length), and raises
        OSError as write() would for a read-only or broken node.

        Every driver either implements this or inherits "None: the slow way";
        a subclass that overrides read() or write() without overriding this
        gets None automatically (BlockNode.__init_subclass__)."""
        return None

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
        raise OSError(95, "Image format driver does not support resize")  # EOPNOTSUPP (QEMU's text)

    async def set_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format in the image, or none
        (QEMU's bdrv_change_backing_file; stream and commit call it when
        they drop layers). Only formats with backing files can."""
        raise OSError(95, "Operation not supported")  # EOPNOTSUPP

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
        f = self.child("file")
        return f.filename() if f else ""

    def cluster_size(self) -> int:
        """The format's allocation unit in bytes (QEMU's BlockDriverInfo
        cluster_size), 0 when it has none; a mirror's default granularity."""
        return 0

    def host_fd(self) -> int | str:
        """A descriptor of a plain host file whose bytes are exactly this node's
        contents (same offsets, same length), or the reason there is none.
        Lets an export hand the data path to the kernel (FUSE passthrough).
        The node owns the fd."""
        return f"passthrough needs a raw export of a plain file (node is '{self.driver}')"

    def data_never_blocks(self) -> bool:
        """Whether reading this node's data never waits for a disk (its file
        lives on tmpfs), so that reads may be spliced from it (a FUSE export
        then mounts for splicing). Format nodes ask their file child."""
        f = self.child("file")
        return f.data_never_blocks() if f is not None else False

    def refresh_length(self) -> int:
        """getlength() after re-reading it from the host, for when someone
        else (the kernel under FUSE passthrough) may have written the file
        past its end. Nodes whose host_fd() is a descriptor implement it."""
        return self.getlength()

    def info(self) -> dict[str, Any]:
        """Driver-specific extra members for query-named-block-nodes' `image`."""
        return {}

    def filtered_node(self) -> BlockNode | None:
        """For a filter (a job's, a point-in-time view): the node whose data
        it shows (QEMU's bdrv_filter_bs), else None."""
        return None

    # --- persistent dirty bitmaps (drivers that store them override) ---------
    def check_can_store_bitmap(self, name: str, granularity: int) -> None:
        """Raise QEMU's error unless a new persistent bitmap could be stored."""
        raise BlockError(f"Can't store persistent bitmaps to {self.node_name}: Operation not supported")

    async def remove_persistent_bitmap(self, name: str) -> None:  # noqa: B027 (optional hook)
        """Drop a persistent bitmap from the image (block-dirty-bitmap-remove)."""


def perm_name(p: Perm) -> str:
    names = {
        Perm.CONSISTENT_READ: "consistent read",
        Perm.WRITE: "write",
        Perm.WRITE_UNCHANGED: "write unchanged",
        Perm.RESIZE: "resize",
    }
    return ", ".join(n for bit, n in names.items() if p & bit)


def combine(edges: list[Edge]) -> tuple[Perm, Perm]:
    """(union of the edges' perm, intersection of their shared)."""
    perm, shared = Perm(0), Perm.ALL
    for e in edges:
        perm |= e.perm
        shared &= e.shared
    return perm, shared


def describe_owner(owner: object) -> str:
    """How QEMU's permission errors name a user of a node: "node 'x'", a
    job ("mirror job 'm'"), else "an unnamed block device" (exports and the
    other users QEMU gives anonymous BlockBackends)."""
    if isinstance(owner, BlockNode):
        return f"node '{owner.node_name}'"
    d = getattr(owner, "describe", None)
    return d() if callable(d) else "an unnamed block device"


class Holes:
    """A daemon-wide count of what may have turned data into holes or zeroes
    anywhere in the graph (a write-zeroes, a discard, a truncate, a change of
    backing or of a parent's node). A cache of "this range is data" (an NBD
    export's) is good while the count has not moved: one integer compare per
    request, where tracking which nodes lie below which would cost a walk."""

    epoch = 0

    @classmethod
    def made(cls) -> None:
        cls.epoch += 1


# --- the wrappers BlockNode.__init_subclass__ puts around a driver's write
# methods: the write threshold is checked before a write (as QEMU does when
# it starts one), dirty bitmaps are marked after it, even when it failed
# part way (QEMU does too: some of it may have landed).
def _marks_write(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def write(self: BlockNode, offset: int, data: Any, **kwargs: Any) -> None:
        if self.write_threshold:
            threshold_check(self, offset, len(data))
        try:
            await fn(self, offset, data, **kwargs)
        finally:
            if self.dirty_bitmaps:
                mark_written(self, offset, len(data))
    return write


def _marks_range(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def write_range(self: BlockNode, offset: int, length: int, **kwargs: Any) -> None:
        if self.write_threshold:
            threshold_check(self, offset, length)
        try:
            await fn(self, offset, length, **kwargs)
        finally:
            Holes.made()
            if self.dirty_bitmaps:
                mark_written(self, offset, length)
    return write_range


def _marks_discard(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def discard(self: BlockNode, offset: int, length: int) -> None:
        try:
            await fn(self, offset, length)
        finally:
            Holes.made()
            # QEMU drops a discard before it is tracked unless discard=unmap
            if self.dirty_bitmaps and self.options.get("discard") == "unmap":
                mark_written(self, offset, length)
    return discard


def _marks_resize(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def truncate(self: BlockNode, size: int, **kwargs: Any) -> None:
        old = self.getlength()
        try:
            await fn(self, size, **kwargs)
        finally:
            Holes.made()
        if self.dirty_bitmaps:
            node_resized(self, old, self.getlength())
    return truncate


def _marks_in_place(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def map_now(self: BlockNode, offset: int, length: int, *, write: bool = False) -> Any:
        extents = fn(self, offset, length, write=write)
        if write and extents is not None:  # the caller writes there in place
            if self.write_threshold:
                threshold_check(self, offset, length)
            if self.dirty_bitmaps:
                mark_written(self, offset, length)
        return extents
    return map_now


_MARKING_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "write": _marks_write,
    "write_zeroes": _marks_range,
    "discard": _marks_discard,
    "truncate": _marks_resize,
    "map_now": _marks_in_place,
}
