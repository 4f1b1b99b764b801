"""Drivers `null-co` and `null-aio`: a node of `size` bytes (default 1 GiB)
that drops writes and reads as zeroes at no cost (one shared zero buffer, no
copy), optionally after `latency-ns`. Benchmarks use it to measure exportd's
own overhead.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from exportd.block import register_driver
from exportd.block.node import BlockNode, BlockStatus, Status
from exportd.block.options import get_bool, get_int
from exportd.extents import ZEROES, Extent

NULL_MEMBERS = frozenset({"size", "read-zeroes", "latency-ns"})
DEFAULT_SIZE = 1 << 30
_ZEROS = bytes(4 << 20)  # shared by every read up to 4 MiB
_ZERO_VIEW = memoryview(_ZEROS)


@register_driver
class NullNode(BlockNode):
    driver = "null-co"
    option_members = NULL_MEMBERS

    def __init__(self, node_name: str, *, read_only: bool, size: int = DEFAULT_SIZE,
                 read_zeroes: bool = False, latency_ns: int = 0) -> None:
        super().__init__(node_name, read_only=read_only)
        self.size = size
        self.read_zeroes = read_zeroes
        self.latency = latency_ns / 1e9

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> NullNode:
        return cls(
            node_name,
            read_only=options["read-only"],
            size=get_int(options, "size", DEFAULT_SIZE),
            read_zeroes=get_bool(options, "read-zeroes", False),
            latency_ns=get_int(options, "latency-ns", 0),
        )

    def getlength(self) -> int:
        return self.size

    def filename(self) -> str:
        return f"{self.driver}://"

    async def allocated_size(self) -> int:
        return 0

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.latency:
            await asyncio.sleep(self.latency)
        if length <= len(_ZEROS):
            return _ZERO_VIEW[:length]
        return bytes(length)

    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        """Zeroes to read, nowhere to write (dropped); None with a latency."""
        if write and self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        if self.latency:
            return None
        return [(ZEROES, 0, length, True)]

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        if self.latency:
            await asyncio.sleep(self.latency)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.write(offset, b"")

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        n = max(1, min(length, self.size - offset))
        st = (Status.ZERO if self.read_zeroes else Status.DATA) | Status.ALLOCATED
        if offset + n >= self.size:
            st |= Status.EOF
        return BlockStatus(st, n)


@register_driver
class NullAioNode(NullNode):
    driver = "null-aio"
