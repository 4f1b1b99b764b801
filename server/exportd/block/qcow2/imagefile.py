"""The image file as qcow2's metadata code uses it: the narrow interface that
the refcount code, the cluster allocator and the write-back share instead of
holding the whole node.

Reads past the file's end return zeroes (a table may end in a hole that was
never written); writes move the end the node knows; flushes make what was
written durable; `corruption` is the hook that stops further writes. The file
is reached through the node's `file` edge, so a node that replaces the file
(BlockGraph.replace_node) is followed at once.
"""

from __future__ import annotations

from collections.abc import Callable

from exportd.block.node import BlockNode, Edge


class ImageFile:
    __slots__ = ("edge", "end", "_on_corruption")

    def __init__(self, edge: Edge, on_corruption: Callable[[str], OSError]) -> None:
        self.edge = edge
        self.end = edge.node.getlength()  # the file's length as far as this node wrote it
        self._on_corruption = on_corruption

    @property
    def node(self) -> BlockNode:
        return self.edge.node

    async def read(self, off: int, n: int) -> bytes | bytearray | memoryview:
        fe = self.end
        if off + n <= fe:
            return await self.edge.node.read(off, n)
        if off >= fe:
            return bytes(n)
        d = await self.edge.node.read(off, fe - off)
        return bytes(d) + bytes(n - (fe - off))

    async def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        await self.edge.node.write(off, data)
        end = off + len(data)
        if end > self.end:
            self.end = end

    async def flush(self) -> None:
        await self.edge.node.flush()

    async def discard(self, off: int, n: int) -> None:
        await self.edge.node.discard(off, n)

    def corruption(self, msg: str) -> OSError:
        """Report corrupt metadata (the node stops writing); raise what it returns."""
        return self._on_corruption(msg)
