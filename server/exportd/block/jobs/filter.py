"""The filter node a block job puts above the node it works on (QEMU's
mirror_top, commit_top and copy-on-read filters).

Every parent of the job's node moves onto the filter (graph.insert_filter),
so every write to the node passes through the job's hands:

- after a write completes the job hears of it (`written`): a mirror marks
  the range dirty, or in write-blocking mode copies it to the target first;
- writes and the job's copies hold their ranges (`RangeLocks`) and wait
  for each other: a stream copying a cluster from the backing chain must
  not overwrite a guest write that lands between its read and its write,
  nor a write-blocking mirror's copy land on the target after the write's.

Reads take the node's own fast path (map_now); writes always take the slow
path, because the job must see each one after it completed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from exportd.block.node import BlockNode, BlockStatus, Perm, Prealloc
from exportd.extents import Extent


class RangeLocks:
    """Byte ranges the job is copying, or a write is writing, right now; an
    overlapping copy or write waits until they let go (QEMU's serialising
    requests)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._released = asyncio.Event()

    def _overlaps(self, offset: int, length: int) -> bool:
        end = offset + length
        return any(o < end and offset < o + n for o, n in self._held.values())

    async def acquire(self, offset: int, length: int) -> int:
        while self._overlaps(offset, length):
            self._released.clear()
            await self._released.wait()
        self._next += 1
        self._held[self._next] = (offset, length)
        return self._next

    def release(self, token: int) -> None:
        del self._held[token]
        self._released.set()


# (offset, length, data or None for zeroes/discard) -> awaited after the write
WriteHook = Callable[[int, int, "bytes | bytearray | memoryview | None"], Awaitable[None]]


class JobFilter(BlockNode):
    """A pass-through node over one child (`role`), owned by a job."""

    driver = "mirror_top"  # per instance: mirror_top, commit_top, copy-on-read

    def __init__(self, node_name: str, driver: str, role: str, owner: Any) -> None:
        super().__init__(node_name, read_only=False)
        self.driver = driver  # type: ignore[misc]
        self.role = role
        self.owner = owner  # the job
        self.locks = RangeLocks()
        self.serialize_writes = False  # writes take range locks too
        self.written: WriteHook | None = None
        # awaited before a write reaches the child (a backup's copy-before-write);
        # raising fails the write
        self.before_write: Callable[[int, int], Awaitable[None]] | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # cleared while frozen (a pivot is coming)
        self._open.set()
        self.redirect: BlockNode | None = None  # after a pivot: where writes go
        self._last_inner: Any = None  # the child, kept for writes that outlive the filter

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> BlockNode:
        raise NotImplementedError("a job filter is only created by its job")

    @property
    def inner(self) -> BlockNode:
        edge = self.child_edges.get(self.role)
        if edge is not None:
            self._last_inner = edge.node
            return edge.node
        # dropped while a write was waiting (for a range, or a thaw): its
        # parents are back on the node it filtered, so the write goes there
        return self._last_inner

    def filtered_node(self) -> BlockNode | None:
        return self.inner

    @property
    def implicit(self) -> bool:
        """QEMU's implicit node: a filter the user did not name (no
        filter-node-name); blockdev-reopen looks through it."""
        return self.auto_named

    # --- permissions: the parents' needs pass to the child ----------------------------
    def apply_permissions(self, perm: Perm, shared: Perm) -> None:
        # what the job itself refuses (resize) it refuses with its own edge on the filter
        edge = self.child_edges.get(self.role)
        if edge is not None:
            edge.node.update(edge, perm, shared)

    # --- data -----------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.inner.getlength()

    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        return None if write else self.inner.map_now(offset, length)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self.inner.read(offset, length)

    async def _write_op(self, offset: int, length: int, data: bytes | bytearray | memoryview | None,
                        op: Callable[[BlockNode], Awaitable[None]]) -> None:
        self._last_inner = self.inner  # where it goes should the filter be dropped meanwhile
        while not self._open.is_set():
            await self._open.wait()
        self.in_flight += 1
        self._idle.clear()
        # the write holds its range until the job has heard of it: a copy
        # that read the old bytes must not land after it (nor before the
        # write-blocking copy to the target)
        token = None
        try:
            if self.serialize_writes:
                token = await self.locks.acquire(offset, length)
            if self.before_write is not None and self.redirect is None:
                await self.before_write(offset, length)
            await op(self.redirect or self.inner)
            if self.written is not None:
                await self.written(offset, length, data)
        finally:
            if token is not None:
                self.locks.release(token)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self._write_op(offset, len(data), data, lambda node: node.write(offset, data, fua=fua))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self._write_op(offset, length, None,
                             lambda node: node.write_zeroes(offset, length, may_unmap=may_unmap))

    async def discard(self, offset: int, length: int) -> None:
        await self._write_op(offset, length, None, lambda node: node.discard(offset, length))

    async def wait_idle(self) -> None:
        """Until no write is in flight through the filter."""
        await self._idle.wait()

    def freeze(self) -> None:
        """New writes wait (in flight ones finish): the job is about to pivot."""
        self._open.clear()

    def thaw(self, redirect: BlockNode | None = None) -> None:
        """Let the waiting writes go, to `redirect` once the parents moved there."""
        if redirect is not None:
            self.redirect = redirect
        self._open.set()

    async def flush(self) -> None:
        await self.inner.flush()

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        await self.inner.truncate(size, prealloc=prealloc, exact=exact)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.inner.block_status(offset, length)

    async def allocated_size(self) -> int:
        return await self.inner.allocated_size()

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        return self.inner.filename()

    def host_fd(self) -> int | str:
        return f"a block job works on the node ({self.owner.describe()})"

    def data_never_blocks(self) -> bool:
        return self.inner.data_never_blocks()

    def refresh_length(self) -> int:
        return self.inner.refresh_length()
