"""Backing chains and where their data lives, for the jobs that copy along them."""

from __future__ import annotations

from exportd.block.node import BlockNode, Status
from exportd.errors import BlockError


def backing_chain(top: BlockNode, base: BlockNode | None = None) -> list[BlockNode]:
    """`top` and its backing nodes down to (not including) `base`."""
    chain: list[BlockNode] = []
    node: BlockNode | None = top
    while node is not None and node is not base:
        chain.append(node)
        node = node.child("backing")
    return chain


def filtered_or_backing(node: BlockNode) -> BlockNode | None:
    """The node below a filter (a job's), or a node's backing node (QEMU's
    bdrv_filter_or_cow_bs): where its data comes from when not its own."""
    return node.filtered_node() or node.child("backing")


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    return node in backing_chain(top)


def overlay_of(top: BlockNode, node: BlockNode) -> BlockNode:
    """The node in top's chain whose backing node is `node`."""
    for n in backing_chain(top):
        if n.child("backing") is node:
            return n
    raise BlockError(f"Node '{node.node_name}' has no overlay in the chain of '{top.node_name}'")


async def allocated_above(top: BlockNode, base: BlockNode | None, offset: int, length: int) -> tuple[bool, bool, int]:
    """Whether [offset, offset + n) is allocated in a node of top's chain
    above `base`, whether it then reads as zeroes, and n (> 0): QEMU's
    bdrv_is_allocated_above with the zero bit of the layer that has it."""
    n = length
    for node in backing_chain(top, base):
        if offset >= node.getlength():
            return True, True, n  # past a shorter layer's end: it reads zeroes
        st = await node.block_status(offset, n)
        if st.status & Status.ALLOCATED:
            return True, bool(st.status & Status.ZERO), min(n, st.length)
        n = min(n, st.length)
    return False, False, n
