"""ExportIO: what every export type does with its node, whatever protocol
brings the request (FUSE today, NBD next).

- Requests are clipped at the export's end: reads are short there, writes
  past it grow a growable export and are cut short otherwise.
- writethrough: the node is flushed after every write and zeroing.
- Backend errors reach the client as EIO, except the few a program can act on.
- A change to the image that may already run in a worker thread is seen to
  the end even when its request is cancelled (hard delete, the session
  closing): the request keeps its reference until the I/O has landed, so
  BLOCK_EXPORT_DELETED never precedes a write.
- Truncation takes the RESIZE permission on the node for that one call,
  unless the export holds it for good (growable).
- The synchronous data path: `read_now` and `write_now` answer at once from
  the node's map_now() (exportd.extents) or say None: await the coroutine.

The reference counting itself is the export's (BlockExport.request()).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from exportd.aio.resume import Resume, start_eagerly
from exportd.block.node import Perm, Prealloc
from exportd.errors import QMPError
from exportd.extents import Extent

if TYPE_CHECKING:
    from exportd.export.base import BlockExport

log = logging.getLogger(__name__)
T = TypeVar("T")

ZERO_CHUNK = 64 * 1024 * 1024  # write_zeroes in pieces: bounded memory for drivers that write buffers

# errnos a client can act on pass through; anything else from a backend is EIO
_PASS_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EINVAL,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOMEM,
        errno.EOPNOTSUPP,
        errno.EINTR,
    }
)


ERROR_EVENT_INTERVAL_S = 1.0


def backend_errno(e: OSError) -> OSError:
    code = e.errno if e.errno in _PASS_ERRNOS else errno.EIO
    return OSError(code, os.strerror(code))


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` even when the request is cancelled (see the module
    docstring). Work that finishes without waiting (tmpfs, page cache) runs
    inline, without a task."""
    started = start_eagerly(work)
    if type(started) is not Resume:
        return started  # type: ignore[return-value]
    task = asyncio.ensure_future(_drive(started))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _drive(work: Resume) -> Any:
    return await work


def write_extents(extents: list[Extent], data: memoryview) -> bool:
    """Write `data` in place over a write mapping; False, having written
    nothing, when a piece could block (the caller awaits write())."""
    if len(extents) == 1:  # the common case, without the loops
        fd, off, n, never_blocks = extents[0]
        if not never_blocks:
            return False
        if fd >= 0:
            done = os.pwrite(fd, data, off)
            while done < n:
                done += os.pwrite(fd, data[done:], off + done)
        return True
    for e in extents:
        if not e[3]:
            return False
    pos = 0
    for fd, off, n, _ in extents:
        if fd >= 0:
            view = data[pos : pos + n]
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:], off + done)
        pos += n
    return True


class ExportIO:
    """The I/O of one export on its node (reached through the export's edge,
    so it follows the node when a job replaces it)."""

    __slots__ = ("export", "_resize_holders", "_growth", "_error_events")

    def __init__(self, export: BlockExport) -> None:
        self.export = export
        self._resize_holders = 0  # truncates in flight holding a temporary RESIZE
        self._growth = asyncio.Lock()  # writes past the end grow one at a time
        self._error_events: dict[str, float] = {}  # operation -> when its last event went out

    def failed(self, e: OSError, operation: str) -> OSError:
        """The errno a client gets for a backend failure, after QEMU's
        BLOCK_IO_ERROR (action report: the request fails). A failing disk
        under load fails every request: one event per operation and second
        at most, so the monitor is not flooded."""
        err = backend_errno(e)
        now = time.monotonic()
        if now - self._error_events.get(operation, -ERROR_EVENT_INTERVAL_S) >= ERROR_EVENT_INTERVAL_S:
            self._error_events[operation] = now
            exp = self.export
            data: dict[str, Any] = {"device": "", "node-name": exp.node.node_name, "operation": operation,
                                    "action": "report", "reason": os.strerror(e.errno or errno.EIO)}
            if e.errno == errno.ENOSPC:
                data["nospace"] = True
            exp.table.daemon.emit_event("BLOCK_IO_ERROR", data)
        return err

    def readable(self, offset: int, size: int) -> int:
        """How many of `size` bytes at `offset` lie before the export's end (0: none)."""
        length = self.export.current_length()
        if offset >= length or size <= 0:
            return 0
        return min(size, length - offset)

    # --- reads ------------------------------------------------------------------
    def read_now(self, offset: int, size: int) -> bytes | list[Extent] | None:
        """Extents of the readable part (b"" at or past the end), or None:
        await read(). No reference is taken: nothing can release the export
        before this returns. (The hot path: readable() is inlined.)"""
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        length = exp.current_length()
        if offset >= length or size <= 0:
            return b""
        if offset + size > length:
            size = length - offset
        try:
            return exp.node.map_now(offset, size)
        except OSError as e:
            raise self.failed(e, "read") from None

    async def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        """The readable part of [offset, offset + size); the caller holds a reference."""
        size = self.readable(offset, size)
        if not size:
            return b""
        try:
            return await self.export.node.read(offset, size)
        except OSError as e:
            raise self.failed(e, "read") from None

    # --- writes -----------------------------------------------------------------
    def write_now(self, offset: int, data: memoryview) -> int | None:
        """write() answered at once when the node maps the range in place
        and nothing else is due (a flush, growth, the end of the export)."""
        exp = self.export
        if not exp.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        if not exp.writable:
            raise OSError(errno.EACCES, "read-only export")
        size = len(data)
        if exp.writethrough or offset + size > exp.current_length():
            return None
        try:
            extents = exp.node.map_now(offset, size, write=True)
            if extents is None or not write_extents(extents, data):
                return None
        except OSError as e:
            raise self.failed(e, "write") from None
        return size

    async def write(self, offset: int, data: memoryview) -> int:
        """Write, growing a growable export or cutting the write short at the
        end; returns the bytes written. The caller holds a reference."""
        exp = self.export
        if not exp.writable:
            raise OSError(errno.EACCES, "read-only export")
        size = len(data)
        length = exp.current_length()
        if offset + size > length:
            if exp.growable:
                await self._grow_to(offset + size)
            elif offset >= length:
                return 0  # FUSE: the kernel turns this into ENOSPC for the writer
            else:
                size = length - offset
                data = data[:size]
        try:
            await to_the_end(exp.node.write(offset, data))
            if exp.writethrough:
                await exp.node.flush()
        except OSError as e:
            raise self.failed(e, "write") from None
        return size

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Zero [offset, offset + length) (punching holes where allowed and
        `may_unmap`), in bounded pieces; durable before returning under writethrough."""
        node = self.export.node
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            try:
                await to_the_end(node.write_zeroes(offset, n, may_unmap=may_unmap))
            except OSError as e:
                raise self.failed(e, "write") from None
            offset += n
        if self.export.writethrough:  # zeroing is a write: durable before the reply
            await self.flush()

    async def flush(self) -> None:
        try:
            await self.export.node.flush()
        except OSError as e:
            raise self.failed(e, "write") from None

    # --- size ---------------------------------------------------------------------
    @asynccontextmanager
    async def resize_permission(self) -> AsyncIterator[None]:
        """RESIZE for the duration of one truncate, unless the export holds it
        for good (growable). Conflicts with other users give EPERM."""
        exp = self.export
        edge = exp.edge
        if exp.growable or edge is None:
            yield
            return
        if self._resize_holders == 0:
            try:
                edge.node.update(edge, edge.perm | Perm.RESIZE, edge.shared)
            except QMPError as e:
                log.info("export %s: no resize permission: %s", exp.id, e.desc)
                raise OSError(errno.EPERM, e.desc) from None
        self._resize_holders += 1
        try:
            yield
        finally:
            self._resize_holders -= 1
            if self._resize_holders == 0 and exp.edge is not None:
                try:
                    edge.node.update(edge, edge.perm & ~Perm.RESIZE, edge.shared)
                except QMPError:  # giving up a permission cannot conflict
                    log.exception("export %s: dropping RESIZE failed", exp.id)

    async def truncate(self, size: int, prealloc: Prealloc = Prealloc.OFF) -> None:
        async with self.resize_permission():
            try:
                await to_the_end(self.export.node.truncate(size, prealloc=prealloc, exact=True))
            except OSError as e:
                raise self.failed(e, "write") from None
        self.export.length_changed()

    async def _grow_to(self, end: int) -> None:
        """Grow, never shrink, to `end` for a write past the end. Growing
        writes may finish out of order: each one re-reads the length under
        the lock, so a nearer end never truncates a farther write away."""
        async with self._growth:
            if self.export.current_length() < end:
                await self.truncate(end)
