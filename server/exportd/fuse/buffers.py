"""Receive buffers shared by all FUSE sessions of one event loop.

A read(2) of /dev/fuse must offer room for the largest request (max_write
plus headers), but one loop reads one request at a time, so sessions on the
same loop share a small pool instead of owning a 1 MiB buffer each. A buffer
stays checked out only while a request that still points into it (a large
WRITE whose handler is suspended) is in flight.

Buffers are anonymous mmaps: pages are only backed by memory once a request
touches them, so an idle pool costs next to nothing.
"""

from __future__ import annotations

import asyncio
import mmap

from exportd.aio.perloop import PerLoop

# How many idle buffers a pool keeps for reuse; more are unmapped.
KEEP_FREE = 4


class BufferPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[memoryview] = []
        self.allocated = 0  # buffers alive (free or checked out)

    def acquire(self) -> memoryview:
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return memoryview(mmap.mmap(-1, self.size))

    def release(self, buf: memoryview) -> None:
        if len(self._free) < KEEP_FREE:
            self._free.append(buf)
        else:
            self.allocated -= 1
            obj = buf.obj
            buf.release()
            try:
                obj.close()  # type: ignore[union-attr]
            except BufferError:
                pass  # a handler still holds a view; the GC unmaps it later

    def discard(self, buf: memoryview) -> None:
        """Forget a buffer someone may still be reading (it is freed with the
        last reference to it, never reused)."""
        self.allocated -= 1

    @property
    def free(self) -> int:
        return len(self._free)


_pools: PerLoop[dict[int, BufferPool]] = PerLoop(lambda _loop: {})


def pool_for(loop: asyncio.AbstractEventLoop, size: int) -> BufferPool:
    """The pool of `size`-byte buffers shared by every session on `loop`."""
    by_size = _pools.get(loop)
    pool = by_size.get(size)
    if pool is None:
        pool = by_size[size] = BufferPool(size)
    return pool
