"""BlockGraph: the daemon's table of named block nodes (QEMU's -blockdev graph).

Contract (used by commands/block.py, the exports and the format drivers):

- `await graph.add(options)`: blockdev-add. `options` are blockdev-add arguments
  with QEMU's member names (driver, node-name, read-only, auto-read-only,
  force-share, discard ignore|unmap, cache {direct, no-flush}, detect-zeroes,
  plus the driver's own members). The new node is owned by the monitor.
- `await graph.open_child(ref, parent, role, perm, shared, *, read_only=...)`:
  for a driver's open(). `ref` is a node name (that node is attached) or a
  nested options dict (opened now, named `#blockNNN` unless it has a
  node-name, owned by `parent` and deleted with it). The parent holds the
  child through the edge `parent.child_edges[role]` (exportd.block.node.Edge);
  `perm`/`shared` are what the parent needs from / allows on the child; a
  driver may change them later with `child.update(edge, ...)`. Drivers reach
  their children only through their edges, never keep the node itself.
  If the driver's open() fails afterwards, the graph releases what it opened.
- `graph.get(name)`: the node, or BlockError `Cannot find device='' nor node-name='x'`.
- `await graph.delete(name)`: blockdev-del, with QEMU's checks and texts.
- `graph.nodes()`: every node, oldest first (children before their parents).
- `graph.replace_node(old, new)`: every parent of `old` (format nodes,
  exports, jobs) moves to `new` at once, permissions checked on `new` first
  (QEMU's bdrv_replace_node); all or nothing.
- `await graph.close_all()`: at shutdown, after the exports are gone.

Drivers come from the registry in exportd.block (see its docstring): a driver
module defines a BlockNode subclass decorated with `@register_driver`, and
`exportd.block.load_driver(name)` imports it on first use (in a thread).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from exportd.block import load_driver
from exportd.block.node import BlockNode, Edge, Holes, Perm, combine
from exportd.block.options import check_members
from exportd.errors import BlockError

log = logging.getLogger(__name__)

# QEMU's id_wellformed() plus the length limit of BlockDriverState.node_name[32]
_NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
_NODE_NAME_MAX = 31

# Members every driver accepts (BlockdevOptionsBase in qapi/block-core.json).
COMMON_MEMBERS = frozenset(
    {"driver", "node-name", "read-only", "auto-read-only", "force-share", "discard", "cache",
     "detect-zeroes"}
)

# Options a nested child inherits from its parent unless it sets them itself
# (cf. bdrv_inherited_options()).
_INHERITED = ("read-only", "auto-read-only", "force-share", "discard", "cache", "detect-zeroes")


def _check_bool(options: dict[str, Any], key: str, prefix: str = "") -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise BlockError(f"Invalid parameter type for '{prefix}{key}', expected: boolean")
    return value


def normalize_common(options: dict[str, Any]) -> dict[str, Any]:
    """Check the members common to every driver and fill in their defaults.
    The schema layer checks types first; this keeps the graph safe for
    callers that bypass it (command line, tests, nested dicts)."""
    opts = dict(options)
    for key in ("read-only", "auto-read-only", "force-share"):
        opts[key] = _check_bool(opts, key)
    discard = opts.get("discard", "ignore")
    if discard == "off":
        discard = "ignore"
    elif discard == "on":
        discard = "unmap"
    if discard not in ("ignore", "unmap"):
        raise BlockError(f"Parameter 'discard' does not accept value '{discard}'")
    opts["discard"] = discard
    cache = opts.get("cache", {})
    if not isinstance(cache, dict):
        raise BlockError("Invalid parameter type for 'cache', expected: object")
    for key in cache:
        if key not in ("direct", "no-flush"):
            raise BlockError(f"Parameter 'cache.{key}' is unexpected")
    opts["cache"] = {
        "direct": _check_bool(cache, "direct", "cache."),
        "no-flush": _check_bool(cache, "no-flush", "cache."),
    }
    dz = opts.get("detect-zeroes", "off")
    if dz not in ("off", "on", "unmap"):
        raise BlockError(f"Parameter 'detect-zeroes' does not accept value '{dz}'")
    if dz == "unmap" and discard != "unmap":
        raise BlockError("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
    opts["detect-zeroes"] = dz
    if opts["force-share"] and not opts["read-only"]:
        raise BlockError("force-share=on can only be used with read-only images")
    return opts


class BlockGraph:
    def __init__(self, daemon: Any = None) -> None:
        self.daemon = daemon
        self._nodes: dict[str, BlockNode] = {}  # insertion order: children first
        self._reserved: set[str] = set()  # names being opened right now
        self._pending_opts: dict[str, dict[str, Any]] = {}  # options of nodes being opened
        self._pending_parents: dict[str, BlockNode] = {}  # nodes being opened that took children
        self._auto_counter = 0

    # --- lookup -------------------------------------------------------------
    def get(self, node_name: str) -> BlockNode:
        node = self._nodes.get(node_name)
        if node is None:
            raise BlockError(f"Cannot find device='' nor node-name='{node_name}'")
        return node

    def find(self, node_name: str) -> BlockNode | None:
        return self._nodes.get(node_name)

    def nodes(self) -> list[BlockNode]:
        return list(self._nodes.values())

    def __contains__(self, node_name: object) -> bool:
        return node_name in self._nodes

    # --- blockdev-add -------------------------------------------------------
    async def add(self, options: dict[str, Any]) -> BlockNode:
        if "node-name" not in options:
            raise BlockError("'node-name' must be specified for the root node")
        node = await self._open(options)
        node.monitor_owned = True
        return node

    async def _open(self, options: dict[str, Any]) -> BlockNode:
        if not isinstance(options, dict):
            raise BlockError("Block options must be an object")
        driver = options.get("driver")
        if not isinstance(driver, str):
            raise BlockError("Parameter 'driver' is missing")
        name = options.get("node-name")
        if name is None:
            name = self._generate_name()
        else:
            self._check_new_name(name)
        cls = await load_driver(driver)
        if cls is None:
            raise BlockError(f"Parameter 'driver' does not accept value '{driver}'")
        opts = normalize_common(options)
        check_members(opts, cls.option_members)
        opts["node-name"] = name
        self._reserved.add(name)
        self._pending_opts[name] = opts
        try:
            node = await cls.open(self, name, opts)
        except BaseException:
            # release the children the driver attached before it failed
            half_open = self._pending_parents.pop(name, None)
            if half_open is not None:
                await self._release_children(half_open)
            raise
        finally:
            self._pending_parents.pop(name, None)
            self._pending_opts.pop(name, None)
            self._reserved.discard(name)
        node.options = opts
        node.cache_direct = opts["cache"]["direct"]
        node.cache_no_flush = opts["cache"]["no-flush"]
        node.force_share = opts["force-share"]
        if opts["detect-zeroes"] != "off":
            _install_detect_zeroes(node, unmap=opts["detect-zeroes"] == "unmap")
        self._nodes[name] = node
        log.debug("opened node %s (driver %s)", name, driver)
        return node

    def _generate_name(self) -> str:
        while True:
            self._auto_counter += 1
            name = f"#block{self._auto_counter:03d}"
            if name not in self._nodes and name not in self._reserved:
                return name

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str):
            raise BlockError("Invalid parameter type for 'node-name', expected: string")
        if not _NODE_NAME_RE.match(name):
            raise BlockError(f"Invalid node-name: '{name}'")
        if len(name) > _NODE_NAME_MAX:
            raise BlockError("Node name too long")
        if name in self._nodes or name in self._reserved:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")

    # --- children -----------------------------------------------------------
    async def open_child(
        self,
        ref: str | dict[str, Any],
        parent: BlockNode,
        role: str,
        perm: Perm,
        shared: Perm,
        *,
        read_only: bool,
    ) -> BlockNode:
        if parent.node_name in self._pending_opts:
            self._pending_parents[parent.node_name] = parent
        created = False
        if isinstance(ref, str):
            child = self._nodes.get(ref)
            if child is None:
                raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        elif isinstance(ref, dict):
            child_opts = dict(ref)
            parent_opts = self._pending_opts.get(parent.node_name) or parent.options
            for key in _INHERITED:
                if key not in child_opts and key in parent_opts:
                    child_opts[key] = parent_opts[key]
            if "read-only" not in ref:
                child_opts["read-only"] = read_only
            child = await self._open(child_opts)
            created = True
        else:
            raise BlockError(f"Invalid parameter type for '{role}', expected: object or string")
        if read_only:
            perm &= ~(Perm.WRITE | Perm.RESIZE)
        try:
            edge = child.attach(parent, perm, shared, role)
        except BaseException:
            if created:
                await self._destroy(child)
            raise
        parent.child_edges[role] = edge
        return child

    async def detach_child(self, parent: BlockNode, role: str) -> None:
        """Drop `parent`'s child in `role`; a child the parent owned is deleted
        when no one else uses it."""
        edge = parent.child_edges.pop(role, None)
        if edge is None:
            return
        child = edge.node
        child.detach(edge)
        if not child.monitor_owned and child.refcount == 0:
            await self._destroy(child)

    async def release(self, edge: Edge) -> None:
        """A parent that is not a node (an export, a job) lets go of its edge;
        a node nobody owns (an implicit snapshot overlay) goes with its last
        user, as in QEMU."""
        node = edge.node
        node.detach(edge)
        if not node.monitor_owned and node.refcount == 0 and self._nodes.get(node.node_name) is node:
            await self._destroy(node)

    # --- moving parents -------------------------------------------------------
    def replace_node(self, old: BlockNode, new: BlockNode, edges: list[Edge] | None = None) -> list[Edge]:
        """Move every edge that points at `old` (or only `edges`) to `new`
        (QEMU's bdrv_replace_node), except edges whose parent is `new` itself
        or lies below it (an overlay keeps its backing edge to `old`). The
        permissions of the moved edges are checked on `new` first; on a
        conflict BlockError is raised and nothing moved. A parent may refuse
        with `refuse_move(edge, new) -> reason or None`; parents that define
        `edge_moved(edge, old)` are told afterwards. Returns the moved edges."""
        if old is new:
            return []
        # a parent at or below `new` would make a loop (an overlay's own
        # backing edge to `old` stays where it is)
        below_new = subtree(new)
        moving = [e for e in (old.users if edges is None else edges) if e.parent not in below_new]
        if not moving:
            return []
        for e in moving:
            new.check_perm(e.perm, e.shared, (), e.parent, e.role)
            refuse = getattr(e.parent, "refuse_move", None)
            reason = refuse(e, new) if refuse is not None else None
            if reason:
                raise BlockError(reason)
        # all the moved edges and new's current users at once: one lock change.
        # The moving edges already count as gone from `old`, so that a `new`
        # sitting on `old` (a job's filter) may pass their permissions down.
        perm, shared = combine([*new.users, *moving])
        old_users = old.users
        old.users = [u for u in old_users if u not in moving]
        try:
            new.apply_permissions(perm, shared)  # raises BlockError: nothing moved
        except BaseException:
            old.users = old_users
            raise
        new.users = [*new.users, *moving]
        new.permissions_changed()
        Holes.made()  # a format node over a new child (or a new backing) may read zeroes where it read data
        for e in moving:
            e.node = new
        old.detach(*moving)
        for e in moving:
            hook = getattr(e.parent, "edge_moved", None)
            if hook is not None:
                try:
                    hook(e, old)
                except Exception:
                    log.exception("%r: edge_moved hook failed", e.parent)
        log.debug("replaced node %s by %s (%d edges moved)", old.node_name, new.node_name, len(moving))
        return moving

    # --- what block jobs change --------------------------------------------------
    def new_node_name(self, name: str | None) -> str:
        """A checked explicit node name, or an automatic #blockNNN."""
        if name is None:
            return self._generate_name()
        self._check_new_name(name)
        return name

    def insert_filter(self, node: BlockNode, filt: BlockNode, role: str) -> None:
        """Put `filt` (a job's filter node, not yet in the graph) above
        `node`: it takes `node` as its `role` child and every parent of
        `node` moves onto it, all or nothing (QEMU's bdrv_append)."""
        edge = node.attach(filt, Perm(0), Perm.ALL, role)
        filt.child_edges[role] = edge
        self._nodes[filt.node_name] = filt
        try:
            self.replace_node(node, filt)
        except BaseException:
            del self._nodes[filt.node_name]
            del filt.child_edges[role]
            node.detach(edge)
            raise

    async def drop_filter(self, filt: BlockNode) -> None:
        """Take a job's filter out: whoever still sits on it moves back
        onto its child, and it goes."""
        (edge,) = filt.child_edges.values()
        if filt.users:
            self.replace_node(filt, edge.node)
        await self._destroy(filt)

    async def set_backing(self, node: BlockNode, backing: BlockNode | None) -> None:
        """Point `node`'s backing edge at `backing`, or drop it (QEMU's
        bdrv_set_backing_hd in the graph; the image header is the driver's).
        The old backing node goes when nobody else holds it."""
        Holes.made()  # what showed through from the old backing may be zeroes now
        edge = node.child_edges.get("backing")
        if edge is None and backing is not None:
            node.child_edges["backing"] = backing.attach(node, Perm.CONSISTENT_READ, Perm.ALL, "backing")
            return
        if edge is None or edge.node is backing:
            return
        old = edge.node
        if backing is None:
            await self.detach_child(node, "backing")
            return
        self.replace_node(old, backing, edges=[edge])
        if not old.monitor_owned and old.refcount == 0 and self._nodes.get(old.node_name) is old:
            await self._destroy(old)

    # --- blockdev-snapshot ------------------------------------------------------
    # The steps live in exportd.block.snapshot (shared with QMP transaction);
    # a single command is a transaction of one action.
    async def snapshot(self, node_name: str, overlay_name: str) -> None:
        """Put `overlay` on top of `node` (QEMU's blockdev-snapshot): `node`
        becomes the overlay's backing node and every other parent of `node`
        moves to the overlay (replace_node), all or nothing."""
        from exportd.block import snapshot, transaction

        await transaction.run([snapshot.SnapshotAction(self, {"node": node_name, "overlay": overlay_name})])

    async def snapshot_sync(self, device: str | None, node_name: str | None, snapshot_file: str,
                            snapshot_node_name: str | None, fmt: str, mode: str) -> None:
        """QEMU's blockdev-snapshot-sync: the overlay image is created or
        taken as it is, opened without its backing chain, then put on top as
        blockdev-snapshot does."""
        from exportd.block import snapshot, transaction

        data: dict[str, Any] = {"snapshot-file": snapshot_file, "format": fmt, "mode": mode}
        for key, value in (("device", device), ("node-name", node_name), ("snapshot-node-name", snapshot_node_name)):
            if value is not None:
                data[key] = value
        await transaction.run([snapshot.SnapshotSyncAction(self, data)])

    def _lookup(self, name: str) -> BlockNode:
        """A node by the name QMP gives as device or node-name (QEMU's
        bdrv_lookup_bs; a storage daemon has no named devices)."""
        node = self._nodes.get(name)
        if node is None:
            raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    # --- block_resize ---------------------------------------------------------
    async def resize(self, node: BlockNode, size: int) -> None:
        """Grow or shrink `node` (QMP block_resize), holding the resize
        permission for the call as QEMU's temporary BlockBackend does; then
        every parent up the graph hears of it (`node_resized`)."""
        if node.read_only:  # QEMU takes the permission, then its truncate refuses
            raise BlockError("Image is read-only")
        resizer = _Resizer()
        edge = node.attach(resizer, Perm.RESIZE, Perm.ALL, "root")  # BlockError on a conflict
        try:
            await node.truncate(size, exact=False)
        except OSError as e:
            raise BlockError(e.strerror or os.strerror(e.errno or 0)) from None
        finally:
            node.detach(edge)
            self.notify_resized(node)

    def notify_resized(self, node: BlockNode) -> None:
        """Tell every parent above `node` that its length may have changed
        (an export then drops what the kernel cached of its size)."""
        for parent in users_above(node):
            hook = getattr(parent, "node_resized", None)
            if hook is not None:
                try:
                    hook()
                except Exception:
                    log.exception("%r: node_resized hook failed", parent)

    async def _release_children(self, node: BlockNode) -> None:
        for role in list(node.children):
            await self.detach_child(node, role)

    async def _destroy(self, node: BlockNode) -> None:
        """Close `node`, forget it and release its children."""
        try:
            await node.close()
        except Exception:
            log.exception("closing node %s failed", node.node_name)
        if self._nodes.get(node.node_name) is node:
            del self._nodes[node.node_name]
        await self._release_children(node)

    # --- blockdev-del -------------------------------------------------------
    async def delete(self, node_name: str) -> None:
        node = self._nodes.get(node_name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{node_name}'")
        parents = [u for u in node.users if isinstance(u.parent, BlockNode)]
        others = [u for u in node.users
                  if not isinstance(u.parent, BlockNode) and not isinstance(getattr(u.parent, "op_blocker", None), str)]
        if others:  # an export or a job's target (QEMU: a BlockBackend) uses it
            raise BlockError(f"Node {node_name} is in use")
        check_not_busy(node)
        if not node.monitor_owned:
            raise BlockError(f"Node {node_name} is not owned by the monitor")
        if parents:
            raise BlockError(f"Block device {node_name} is in use")
        await self._destroy(node)

    async def close_all(self) -> None:
        """Close every node, parents before children; nothing is left after."""
        for node in reversed(list(self._nodes.values())):
            if node.node_name not in self._nodes:
                continue  # already gone with its parent
            for edge in list(node.users):
                if not isinstance(edge.parent, BlockNode):
                    log.warning("node %s still used by %r at shutdown", node.node_name, edge.parent)
                    node.detach(edge)
            await self._destroy(node)
        self._nodes.clear()


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    n = len(data)
    return n > 0 and data[0] == 0 and data[-1] == 0 and data.count(0) == n


def _install_detect_zeroes(node: BlockNode, *, unmap: bool) -> None:
    """detect-zeroes=on|unmap: a write of zeroes becomes write_zeroes (which
    may punch a hole when unmap is allowed), as QEMU does on the node."""
    if type(node).write_zeroes is BlockNode.write_zeroes:
        return  # the driver would only write the zeroes back: nothing to gain
    plain_write = node.write

    async def write(offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if is_zero(data):
            await node.write_zeroes(offset, len(data), may_unmap=unmap)
            if fua:
                await node.flush()
            return
        await plain_write(offset, data, fua=fua)

    node.write = write  # type: ignore[method-assign]
    plain_map_now = node.map_now

    def map_now(offset: int, length: int, *, write: bool = False) -> Any:
        # the bytes of a write must be looked at: no in-place shortcut
        return None if write else plain_map_now(offset, length)

    node.map_now = map_now  # type: ignore[method-assign]


def check_not_busy(node: BlockNode, *, backing: bool = True) -> None:
    """QEMU's op blockers, with its texts: a block job's hold on the node
    (the newest blocker is reported first), or its use as a backing node
    (unless `backing` is False: stream and commit work on backing nodes)."""
    for e in reversed(node.users):
        blocker = getattr(e.parent, "op_blocker", None)
        if isinstance(blocker, str):
            raise BlockError(f"Node '{node.node_name}' is busy: {blocker}")
        if backing and e.role == "backing" and isinstance(e.parent, BlockNode):
            raise BlockError(f"Node '{node.node_name}' is busy: node is used as backing hd of '{e.parent.node_name}'")



# Drivers QEMU marks is_filter whose filtered child is not a job's (those
# say so through filtered_node()): driver -> the child they show.
FILTER_CHILD_ROLES = {"throttle": "file"}


def filter_child(node: BlockNode) -> BlockNode | None:
    """The node a filter shows (QEMU's bdrv_filter_bs), None for any other node."""
    inner = node.filtered_node()
    if inner is not None:
        return inner
    role = FILTER_CHILD_ROLES.get(node.driver)
    return node.child(role) if role is not None else None


def can_replace(source: BlockNode, to_replace: BlockNode) -> bool:
    """QEMU's bdrv_recurse_can_replace: a mirror of `source` may replace
    `to_replace` only if it is `source` or lies below it through filters
    (anything else would change what its parents see at once)."""
    node: BlockNode | None = source
    while node is not None:
        if node is to_replace:
            return True
        node = filter_child(node)
    return False


class _Resizer:
    """The user block_resize attaches for the time of the call."""

    def describe(self) -> str:
        return "an unnamed block device"  # QEMU's block_resize uses an anonymous BlockBackend


def parent_users(node: BlockNode) -> list[Edge]:
    return [u for u in node.users if isinstance(u.parent, BlockNode)]


def users_above(node: BlockNode) -> Iterator[object]:
    """Every parent above `node` that is not a node (exports, jobs), once
    each, through any number of node layers."""
    seen: set[int] = set()
    pending = [node]
    while pending:
        for e in pending.pop().users:
            parent = e.parent
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            if isinstance(parent, BlockNode):
                pending.append(parent)
            else:
                yield parent


def subtree(node: BlockNode) -> set[BlockNode]:
    """`node` and every node below it."""
    seen: set[BlockNode] = set()
    pending = [node]
    while pending:
        n = pending.pop()
        if n in seen:
            continue
        seen.add(n)
        pending.extend(e.node for e in n.child_edges.values())
    return seen
