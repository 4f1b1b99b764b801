"""blockdev-reopen: change the options of live nodes, all or nothing (QEMU's
bdrv_reopen_multiple), and the calls the block jobs make on a live graph.

- `await reopen_many(graph, list_of_options)`: each element is a node's full
  set of options (blockdev-add's members; an omitted option goes back to its
  default), children named by node name. Phases: (1) build the queue: the
  nodes given, plus the `file` child of a node whose `read-only` is given,
  which follows it (QEMU's option inheritance, for a child that is named
  as it already is); every change a driver cannot make live is refused
  here, with QEMU's "Cannot change the option 'x'"; (2) each driver's
  reopen_prepare (BlockNode: new descriptors, image checks, a flush before
  going read-only); (3) permissions for the new state: edges between the
  nodes, new backing edges, OFD locks (through the nodes' usual permission
  machinery); (4) commit, children first. A failure in (1)-(3) undoes what
  was done and leaves every node as it was.
- `await set_read_only(graph, node, read_only)`: one node (and its file
  child) read-only or writable, its other options kept: what block-commit
  does to its base (QEMU's bdrv_reopen_set_read_only).

Qcow2Node.set_backing_file(filename, fmt) rewrites an image's backing file
name in its header (stream and commit, when they drop layers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exportd.block.graph import normalize_common, subtree
from exportd.block.node import BlockNode, Edge, Perm
from exportd.errors import BlockError

log = logging.getLogger(__name__)

# members every driver may change live (BlockdevOptionsBase; force-share may not)
_COMMON_LIVE = ("read-only", "auto-read-only", "discard", "cache", "detect-zeroes")
_CHILD_ROLES = ("file", "backing")
# what nested child options take from the parent's unless they state it
# (force-share is not among them in QEMU's reopen)
_INHERITED = ("read-only", "auto-read-only", "discard", "cache", "detect-zeroes")
_WRITERS = Perm.WRITE | Perm.RESIZE


@dataclass
class _Plan:
    node: BlockNode
    options: dict[str, Any]  # the full normalized new options
    read_only: bool
    children: dict[str, BlockNode | None] = field(default_factory=dict)  # roles that change
    hooks: Any = None  # (commit, abort) from the driver's reopen_prepare
    new_edges: dict[str, Edge] = field(default_factory=dict)  # role -> edge to the new child


async def reopen_many(graph: Any, options_list: list[dict[str, Any]], *, internal: bool = False) -> None:
    """QMP blockdev-reopen on `graph` (see the module docstring); `internal`
    (a job's reopen) may name nodes whose names were generated."""
    plans = _queue(graph, options_list, internal)
    if not plans:
        return
    order = _bottom_up(plans)
    prepared: list[_Plan] = []
    undo: list[Callable[[], None]] = []
    try:
        for p in order:
            p.hooks = await p.node.reopen_prepare(p.options, p.read_only)
            prepared.append(p)
        _permissions(order, undo)
    except BaseException:
        for fn in reversed(undo):
            try:
                fn()
            except Exception:
                log.exception("blockdev-reopen: undoing a permission change failed")
        for p in reversed(prepared):
            if p.hooks is not None:
                try:
                    await p.hooks[1]()
                except Exception:
                    log.exception("blockdev-reopen: abort of %s failed", p.node.node_name)
        raise
    for p in order:
        await _commit(graph, p)


async def set_read_only(graph: Any, node: BlockNode, read_only: bool) -> None:
    """Make `node` read-only or writable with its other options as they are
    (QEMU's bdrv_reopen_set_read_only); its `file` child follows. Raises
    BlockError with QEMU's texts and changes nothing when it cannot."""
    if node.read_only == read_only:
        return
    opts = _current_options(node)
    opts["read-only"] = read_only
    await reopen_many(graph, [opts], internal=True)


# --- phase 1: the queue ----------------------------------------------------------
def _current_options(node: BlockNode) -> dict[str, Any]:
    """The node's options as a reopen would restate them: children by name."""
    opts = {k: v for k, v in node.options.items() if k not in _CHILD_ROLES}
    for role, e in node.child_edges.items():
        opts[role] = e.node.node_name
    if type(node).supports_backing and "backing" not in node.child_edges:
        opts["backing"] = None
    return opts


def _queue(graph: Any, options_list: list[dict[str, Any]], internal: bool = False) -> list[_Plan]:
    plans: dict[str, _Plan] = {}
    given: list[tuple[_Plan, dict[str, Any]]] = []
    pending = [(o, True) for o in options_list]
    while pending:
        raw, listed = pending.pop(0)
        name = raw.get("node-name")
        if name is None:
            raise BlockError("node-name not specified")
        node = graph.find(name)
        if node is None:
            raise BlockError(f"Cannot find device='' nor node-name='{name}'")
        if listed and node.auto_named and not internal:  # QEMU: a generated name was never an option
            raise BlockError("Cannot change the option 'node-name'")
        if raw.get("driver") != node.driver:
            raise BlockError("Cannot change the option 'driver'")
        if bool(raw.get("force-share")) != bool(node.options.get("force-share")):
            raise BlockError("Cannot change the option 'force-share'")
        opts = normalize_common(raw)
        _check_changes(node, opts)
        plan = _Plan(node, opts, opts["read-only"])
        plan.children = _child_changes(graph, node, opts)
        # nested options are the current child's new options (QEMU's
        # "file.x"): that child is reopened too
        for role in _CHILD_ROLES:
            ref, child = raw.get(role), node.child(role)
            if isinstance(ref, dict) and child is not None:
                if ref.get("node-name", child.node_name) != child.node_name:
                    raise BlockError(f"Cannot change the option '{role}.node-name'")
                sub = dict(ref, **{"node-name": child.node_name})
                for key in _INHERITED:  # what the parent states, unless the child does
                    if key not in sub and key in raw:
                        sub[key] = raw[key]
                if role == "backing":
                    sub.setdefault("read-only", True)
                pending.append((sub, False))
        plans[name] = plan  # a later element for the same node wins (as in QEMU)
        given.append((plan, raw))
    # a `file` child named as it is follows its parent's explicit read-only
    for plan, raw in given:
        child = plan.node.child("file")
        if child is None or "file" in plan.children or "read-only" not in raw:
            continue
        if child.node_name in plans or child.read_only == plan.read_only:
            continue
        if not plan.read_only or not _other_writers(child, plan.node):
            opts = dict(child.options, **{"read-only": plan.read_only})
            plans[child.node_name] = _Plan(child, opts, plan.read_only)
    return list(plans.values())


def _check_changes(node: BlockNode, opts: dict[str, Any]) -> None:
    """Refuse what the driver cannot change live, with QEMU's text."""
    cls = type(node)
    fixed = cls.option_members - cls.reopen_members - set(_CHILD_ROLES)
    for key in sorted(fixed):
        if opts.get(key) != node.options.get(key):
            raise BlockError(f"Cannot change the option '{key}'")


def _child_changes(graph: Any, node: BlockNode, opts: dict[str, Any]) -> dict[str, BlockNode | None]:
    """role -> the new child (None: no child) for the roles that change."""
    changes: dict[str, BlockNode | None] = {}
    for role in _CHILD_ROLES:
        if role == "backing" and not type(node).supports_backing:
            continue
        if role == "file" and not node.is_format:
            continue
        current = node.child(role)
        if role not in opts:
            # also when the image names a backing file that is not open
            header = getattr(node, "header", None)
            if role == "backing" and (current is not None or getattr(header, "backing_file", None)):
                raise BlockError(f"backing is missing for '{node.node_name}'")
            continue
        ref = opts[role]
        if isinstance(ref, dict):
            # nested options describe the current child; exportd does not
            # reopen children through them: they must restate it
            if current is None or ref.get("driver", current.driver) != current.driver:
                raise BlockError(f"Cannot change the option '{role}.driver'")
            opts[role] = current.node_name
            continue
        if ref is None:
            if current is not None:
                changes[role] = None
            continue
        target = graph.find(ref)
        if target is None:
            raise BlockError(f"Cannot find device='' nor node-name='{ref}'")
        if target is node or node in subtree(target):
            raise BlockError(f"Making '{target.node_name}' a {role} child of '{node.node_name}' would create a cycle")
        if target is current:
            continue
        if current is not None:
            # QEMU looks through filters the user did not name (a job's)
            if _skip_implicit(current) is target:
                continue
            if getattr(current, "implicit", False):
                raise BlockError(f"Cannot replace implicit {role} child of {node.node_name}")
        changes[role] = target  # a new `file` too (QEMU 6.1+: inserting or removing a filter)
    return changes


def _skip_implicit(node: BlockNode) -> BlockNode:
    while getattr(node, "implicit", False):
        below = node.filtered_node()
        if below is None:
            break
        node = below
    return node


def _other_writers(node: BlockNode, parent: BlockNode) -> bool:
    return any(e.perm & _WRITERS for e in node.users if e.parent is not parent)


def _bottom_up(plans: list[_Plan]) -> list[_Plan]:
    """Children before parents (a file is writable before its qcow2 writes)."""
    by_node = {p.node: p for p in plans}
    out: list[_Plan] = []
    seen: set[BlockNode] = set()

    def visit(n: BlockNode) -> None:
        if n in seen:
            return
        seen.add(n)
        for e in n.child_edges.values():
            visit(e.node)
        if n in by_node:
            out.append(by_node[n])

    for p in plans:
        visit(p.node)
    return out


# --- phase 3: permissions ---------------------------------------------------------
def _child_perm(parent: BlockNode, role: str, edge: Edge, read_only: bool) -> tuple[Perm, Perm]:
    """What `parent` needs on its child in `role` once (not) read-only."""
    want = getattr(parent, "child_perm", None)
    if want is not None:
        got = want(role, read_only)
        if got is not None:
            return got
    return edge.perm, edge.shared


def _permissions(order: list[_Plan], undo: list[Callable[[], None]]) -> None:
    """Every permission of the new state, checked and taken (OFD locks
    included); `undo` collects what puts the old state back."""
    for p in order:
        node, old = p.node, p.node.read_only
        node.read_only = p.read_only
        undo.append(lambda n=node, o=old: setattr(n, "read_only", o))  # type: ignore[misc]
    # parents going read-only give up writing their children first
    for p in reversed(order):
        if p.read_only:
            _update_child_edges(p, undo)
    for p in reversed(order):  # parents first: a parent's writer is the cause
        if p.read_only:
            for e in p.node.users:
                if e.perm & _WRITERS:
                    raise BlockError(f"Read-only block node '{p.node.node_name}' cannot support read-write users")
    # new children (a new backing or file node): what the old child's edge
    # had (a writable format node writes its new file), a new backing reads
    for p in order:
        for role, target in p.children.items():
            if target is None:
                continue
            old_edge = p.node.child_edges.get(role)
            if old_edge is not None:
                perm, shared = _child_perm(p.node, role, old_edge, p.read_only)
                # the old child is let go in the same step (QEMU swaps the
                # edge in one transaction): a filter over the old child
                # (file -> throttle -> file) must not conflict with it
                kept = (old_edge.perm, old_edge.shared)
                old_edge.node.update(old_edge, Perm(0), Perm.ALL)
                undo.append(lambda e=old_edge, k=kept: e.node.update(e, *k))  # type: ignore[misc]
            else:
                perm, shared = Perm.CONSISTENT_READ, Perm.ALL
            edge = target.attach(p.node, perm, shared, role)
            undo.append(lambda t=target, e=edge: t.detach(e))  # type: ignore[misc]
            p.new_edges[role] = edge
    # writable nodes take write on their children (and the children's locks)
    for p in reversed(order):
        if not p.read_only:
            _update_child_edges(p, undo)


def _update_child_edges(p: _Plan, undo: list[Callable[[], None]]) -> None:
    for role, edge in list(p.node.child_edges.items()):
        if role in p.children:
            continue  # replaced: its new edge already has what this node needs
        perm, shared = _child_perm(p.node, role, edge, p.read_only)
        if (perm, shared) == (edge.perm, edge.shared):
            continue
        old = (edge.perm, edge.shared)
        edge.node.update(edge, perm, shared)  # BlockError: unchanged
        undo.append(lambda e=edge, o=old: e.node.update(e, *o))  # type: ignore[misc]


# --- phase 4: commit ----------------------------------------------------------------
async def _commit(graph: Any, p: _Plan) -> None:
    from exportd.block.graph import _install_detect_zeroes

    node = p.node
    length = node.getlength()
    for role, target in p.children.items():
        await graph.detach_child(node, role)  # the old child (an implicit one goes with it)
        if target is not None:
            node.child_edges[role] = p.new_edges[role]
            moved = getattr(node, "child_replaced", None)  # a driver that keeps the edge at hand
            if moved is not None:
                moved(role, p.new_edges[role])
    if p.hooks is not None:
        try:
            await p.hooks[0]()
        except Exception:
            log.exception("blockdev-reopen: commit of %s failed", node.node_name)
    opts = p.options
    node.cache_direct = opts["cache"]["direct"]
    node.cache_no_flush = opts["cache"]["no-flush"]
    old_dz = node.options.get("detect-zeroes", "off")
    if opts["detect-zeroes"] != old_dz or (old_dz == "unmap" and opts["discard"] != node.options.get("discard")):
        node.__dict__.pop("write", None)  # the plain driver methods again
        node.__dict__.pop("map_now", None)
        if opts["detect-zeroes"] != "off":
            _install_detect_zeroes(node, unmap=opts["detect-zeroes"] == "unmap")
    new = dict(opts)
    for role in _CHILD_ROLES:
        e = node.child_edges.get(role)
        if e is not None:
            new[role] = e.node.node_name if e.node.monitor_owned else node.options.get(role, e.node.node_name)
        elif role in new or role in node.options:
            new[role] = None
    new["node-name"] = node.node_name
    node.options = new
    if node.getlength() != length:  # a raw window moved: exports above hear of it
        graph.notify_resized(node)
    log.debug("reopened node %s (read-only %s)", node.node_name, node.read_only)
