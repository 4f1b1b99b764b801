"""An export's READ and WRITE done by FUSE ring threads, off the loop.

When an export's node is a host file (a `file` node, or `raw` over one, not
O_DIRECT), a READ or WRITE is one preadv or pwritev on that file, with
nothing else to do: no metadata to look up or change. Ring threads
(fuse/ringthread.py) then do it themselves, between the ring entry and the
file, and the loop never sees the request. Only files on a local file
system qualify: one on FUSE (our own export, say) could need the loop to
answer the thread's read. Everything else goes to the loop as before:
other nodes (qcow2 maps clusters the loop may free and reuse), reads of a
page a disk must bring (RWF_NOWAIT), writes that must be seen (dirty
bitmaps, a write threshold, detect-zeroes, writethrough), writes past the
end.

What the threads may do is a `View`, made on the loop and replaced, never
changed:

- It is made lazily, when a request the threads declined reaches the loop
  (refresh), and is valid while the export's node is the node it was made
  for: a job's filter or pivot changes the node, and the threads then
  decline until the loop looks again.
- Every QMP command other than a query (and the few that change nothing
  a write must see: daemon.py) runs quiesced(): every export's
  view is dropped, the command waits until the requests already inside
  every dropped view have left (a second command too, not only the one
  that dropped it), and no view is made until it has returned. A command can
  therefore add a bitmap, set a threshold, insert a filter or reopen the
  node without a thread write slipping past it, which would otherwise land
  unmarked or on the old node.
- The threads read and write through a duplicate of the file's descriptor,
  closed when the view is dropped and its last request has left, so a node
  closed (or a descriptor number reused) meanwhile is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from exportd.block.file import FileNode
from exportd.block.raw import RawNode

if TYPE_CHECKING:
    from exportd.block.node import BlockNode
    from exportd.export.base import BlockExport

_views: weakref.WeakSet[HostFileIO] = weakref.WeakSet()
_ZEROES = bytes(1 << 20)


class View:
    """What the threads may do for one node of the export (see above)."""

    __slots__ = ("node", "file", "fd", "base", "writable", "read_flags", "users", "dropped", "drained")

    def __init__(self, node: BlockNode, file: FileNode, fd: int, base: int, writable: bool) -> None:
        self.node = node
        self.file = file
        self.fd = fd
        self.base = base  # where the node's byte 0 lies in the file
        self.writable = writable
        # tmpfs never waits; a disk-backed file's page may (EAGAIN: the loop's pool reads it)
        self.read_flags = 0 if file.data_never_blocks() else os.RWF_NOWAIT
        self.users = 0  # thread requests inside (under HostFileIO.lock)
        self.dropped = False
        self.drained: asyncio.Future[None] | None = None  # done when the last request left


def host_file(node: BlockNode) -> tuple[FileNode, int] | None:
    """(file node, offset of the node's byte 0 in it) when the node's bytes
    are a host file's, read and written in place; else None."""
    base = 0
    file = node
    if type(node) is RawNode:
        base = node.offset
        file = node.file
    # a local file system only: a file on FUSE (our own export, say) could
    # need the loop to answer the thread's read, or its close
    if type(file) is not FileNode or file.direct or file.fd < 0 or not file._local_fs:
        return None
    return file, base


def _writes_seen(node: BlockNode) -> bool:
    """Whether a write to this node must go past the loop: bitmaps to mark,
    a threshold to check, a detect-zeroes wrapper."""
    return bool(node.dirty_bitmaps or node.write_threshold or "map_now" in vars(node))


class HostFileIO:
    """The fuse.filesystem.RingIO of one export; see the module docstring."""

    def __init__(self, export: BlockExport) -> None:
        self.export = export
        self.lock = threading.Lock()
        self.view: View | None = None
        self._looked_at: BlockNode | None = None  # the node refresh last found unfit
        self._loop = asyncio.get_running_loop()
        _views.add(self)

    # --- the threads --------------------------------------------------------------

    def _enter(self, write: bool) -> View | None:
        exp = self.export
        v = self.view
        if v is None or exp.node is not v.node or not exp.user_owned:
            return None
        if write and not v.writable:
            return None
        with self.lock:
            if v.dropped:
                return None
            v.users += 1
        return v

    def _leave(self, v: View) -> None:
        with self.lock:
            v.users -= 1
            last = v.dropped and not v.users
        if last:
            _close(v.fd)
            if v.drained is not None:
                self._loop.call_soon_threadsafe(_set_done, v.drained)

    def read_into(self, view: memoryview, offset: int) -> int | None:
        v = self._enter(False)
        if v is None:
            return None
        try:
            length = self.export.current_length()
            size = len(view)
            if offset >= length:
                return 0
            if offset + size > length:
                size = length - offset
            got = 0
            at = v.base + offset
            while got < size:
                # a page the disk must bring: the loop's pool waits, not this queue
                n = os.preadv(v.fd, [view[got:size]], at + got, v.read_flags)
                if n == 0:
                    # past the host file's end: zeroes, as the file node reads
                    while got < size:
                        n = min(size - got, len(_ZEROES))
                        view[got : got + n] = _ZEROES[:n]
                        got += n
                    break
                got += n
            return size
        except OSError:
            return None  # the loop answers, with its errno and event
        finally:
            self._leave(v)

    def write_from(self, data: memoryview, offset: int) -> int | None:
        v = self._enter(True)
        if v is None:
            return None
        try:
            size = len(data)
            if offset + size > self.export.current_length():
                return None  # growth or a short write: the loop's
            at = v.base + offset
            if at + size > v.file.getlength():
                return None
            done = 0
            while done < size:
                done += os.pwritev(v.fd, [data[done:]], at + done)
            return size
        except OSError:
            return None  # written again by the loop, which reports the error
        finally:
            self._leave(v)

    # --- the loop -----------------------------------------------------------------

    def refresh(self) -> None:
        exp = self.export
        node = exp.node
        v = self.view
        if v is not None and v.node is node:
            return
        if v is None and self._looked_at is node:
            return  # unfit, and nothing changed since
        if _commands_running:
            return  # the loop answers until the command is done
        self._drop()
        self._looked_at = node
        found = host_file(node) if exp.user_owned else None
        if found is None:
            return
        file, base = found
        writable = bool(
            exp.writable and not exp.writethrough and not node.read_only and not file.read_only
            and not _writes_seen(node) and not _writes_seen(file)
        )
        self.view = View(node, file, os.dup(file.fd), base, writable)

    def _drop(self) -> None:
        """Drop the view. Until its last request has left, a future of
        _draining says so (every quiesce waits for all of them: a second
        command must not slip past the first one's wait)."""
        v, self.view = self.view, None
        self._looked_at = None
        if v is None:
            return
        with self.lock:
            v.dropped = True
            last = not v.users
            if not last:
                v.drained = self._loop.create_future()
                _draining.add(v.drained)
                v.drained.add_done_callback(_draining.discard)
        if last:
            _close(v.fd)

    def close(self) -> None:
        self._drop()
        _views.discard(self)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # a duplicate: the node's own descriptor reports the file's errors


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_commands_running = 0  # commands inside quiesced(): no view is made meanwhile
_draining: set[asyncio.Future[None]] = set()  # dropped views with requests inside


@contextlib.asynccontextmanager
async def quiesced() -> AsyncIterator[None]:
    """Around a command that may change what a write must do (see the
    module docstring): no thread write is in flight once it starts, and
    none starts before it has returned (the command may wait, and requests
    reaching the loop meanwhile must not make a view of the old graph)."""
    global _commands_running
    _commands_running += 1
    try:
        for h in list(_views):
            h._drop()
        while _draining:
            drained = next(iter(_draining))
            await drained
            _draining.discard(drained)
        yield
    finally:
        _commands_running -= 1
