"""QEMU's write threshold (block-set-write-threshold): one event when a
write first reaches past a byte offset of a node, so that a manager can
grow a thin volume before it fills (libvirt sets it on the protocol node
under a qcow2 image). The threshold then switches itself off, as QEMU's
does, so that the monitor is not flooded.

The check runs from the same write hooks as the dirty bitmaps
(BlockNode.__init_subclass__): writes and zero writes, by any path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exportd.block.node import BlockNode

# node -> how to emit the event (the daemon's emit_event), while a threshold is set
Emit = Callable[[str, dict[str, Any]], None]


def set_threshold(node: BlockNode, threshold: int, emit: Emit) -> None:
    """0 switches it off."""
    node.write_threshold = threshold
    node.threshold_emit = emit if threshold else None


def check(node: BlockNode, offset: int, length: int) -> None:
    threshold = node.write_threshold
    end = offset + length
    if threshold and end > threshold:
        node.write_threshold = 0
        emit, node.threshold_emit = node.threshold_emit, None
        if emit is not None:
            emit("BLOCK_WRITE_THRESHOLD", {"node-name": node.node_name, "amount-exceeded": end - threshold,
                                           "write-threshold": threshold})
