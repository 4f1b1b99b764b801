"""x-debug-query-block-graph: the graph as QEMU's XDbgBlockGraph.

Nodes are every block node (type block-driver, named by node-name) and
every parent of an edge that is not a node. Such a parent may say what it
is with a class attribute `graph_node_type` ("block-backend" or
"block-job") and a method `graph_node_name() -> str`; without them it is a
block-backend with an empty name, which is how QEMU shows an export's
anonymous BlockBackend (and blockdev-create's, block_resize's).

Ids and order follow QEMU's builder, so replies line up with
qemu-storage-daemon's for the same graph: ids count from 1 in the order
things are first mentioned (backends, then jobs, then nodes oldest first,
each with its edges), and both lists come out newest first. An edge is
named by its role ("file", "backing"; "root" for a backend's edge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exportd.block.node import BlockNode, Edge, Perm

# QEMU's BlockPermission names, in its enum's order (exportd has no graph-mod)
_PERM_NAMES = (
    (Perm.CONSISTENT_READ, "consistent-read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write-unchanged"),
    (Perm.RESIZE, "resize"),
)


def perm_list(p: Perm) -> list[str]:
    # QEMU builds the list by prepending: highest permission first
    return [name for bit, name in reversed(_PERM_NAMES) if p & bit]


def node_type(parent: object) -> str:
    if isinstance(parent, BlockNode):
        return "block-driver"
    return getattr(parent, "graph_node_type", "block-backend")


def node_name(parent: object) -> str:
    if isinstance(parent, BlockNode):
        return parent.node_name
    name = getattr(parent, "graph_node_name", None)
    return name() if callable(name) else ""


def block_graph(nodes: list[BlockNode], parents: Sequence[object] = ()) -> dict[str, Any]:
    """The XDbgBlockGraph of `nodes` (BlockGraph.nodes(): oldest first).
    `parents` lists parents that are not nodes oldest first (the exports:
    QEMU lists BlockBackends in the order they were made); any other comes
    after them, in the order the nodes' users name it."""
    ids: dict[int, int] = {}
    out_nodes: list[dict[str, Any]] = []
    out_edges: list[dict[str, Any]] = []

    def num(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids) + 1)

    def add_node(obj: object) -> None:
        out_nodes.append({"id": num(obj), "type": node_type(obj), "name": node_name(obj)})

    def add_edge(edge: Edge) -> None:
        out_edges.append({
            "parent": num(edge.parent), "child": num(edge.node), "name": edge.role or "root",
            "perm": perm_list(edge.perm), "shared-perm": perm_list(edge.shared),
        })

    # the parents that are not nodes, each with its edges, in the order met
    others: dict[int, tuple[object, list[Edge]]] = {id(p): (p, []) for p in parents}
    for n in nodes:
        for e in n.users:
            if not isinstance(e.parent, BlockNode):
                others.setdefault(id(e.parent), (e.parent, []))[1].append(e)
    for kind in ("block-backend", "block-job"):
        for parent, edges in others.values():
            if edges and node_type(parent) == kind:
                add_node(parent)
                for e in edges:
                    add_edge(e)
    for n in nodes:
        add_node(n)
        # QEMU keeps a node's children newest first
        for e in reversed(n.child_edges.values()):
            add_edge(e)
    out_nodes.reverse()
    out_edges.reverse()
    return {"nodes": out_nodes, "edges": out_edges}
