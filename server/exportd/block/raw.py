"""Format driver `raw`: the bytes of its `file` child, optionally a window
[offset, offset + size) of them. Nothing outside the window is ever read or
written. raw forwards its users' permissions to the child unchanged, so it
shares writes on the file exactly when its users do (as QEMU's raw does).
"""

from __future__ import annotations

import errno
import json
from typing import Any

from exportd.block import register_driver
from exportd.block.file_create import file_create_steps
from exportd.block.node import BlockNode, BlockStatus, Perm, Prealloc, Status
from exportd.block.options import get_int
from exportd.errors import BlockError
from exportd.extents import Extent

RAW_MEMBERS = frozenset({"file", "offset", "size"})
SECTOR = 512


@register_driver
class RawNode(BlockNode):
    driver = "raw"
    option_members = RAW_MEMBERS
    reopen_members = frozenset({"offset", "size"})
    is_format = True

    def __init__(self, node_name: str, *, read_only: bool, offset: int = 0, size: int | None = None) -> None:
        super().__init__(node_name, read_only=read_only)
        self.offset = offset
        self.size = size  # None: the window reaches the child's end

    # --- the driver table ---------------------------------------------------------
    @classmethod
    def probe(cls, head: bytes) -> int:
        return 1  # raw takes anything: the format when no other claims the image

    @classmethod
    def create_steps(cls, graph: Any, options: dict[str, Any]) -> tuple[Any, Any] | None:
        return file_create_steps(options)  # exportd's alias of file (QEMU has no raw creation)

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> RawNode:
        if "file" not in options:
            raise BlockError("Parameter 'file' is missing")
        offset = get_int(options, "offset", 0)
        size = get_int(options, "size", None)
        read_only = options["read-only"]
        node = cls(node_name, read_only=read_only, offset=offset, size=size)
        child = await graph.open_child(options["file"], node, "file", Perm(0), Perm.ALL, read_only=read_only)
        # a writable raw node over a read-only file opens (as in QEMU); taking
        # the write permission later fails with "Block node is read-only"
        _check_window(offset, size, child.getlength())
        node.request_alignment = child.request_alignment
        return node

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """A new window (offset, size) is checked as at open; nothing else to do
        (permissions are forwarded to the file as they are)."""
        offset = get_int(options, "offset", 0)
        size = get_int(options, "size", None)
        _check_window(offset, size, self.file.getlength())

        async def commit() -> None:
            self.offset, self.size = offset, size

        async def abort() -> None:
            pass

        return commit, abort

    @property
    def file(self) -> BlockNode:
        return self.child_edges["file"].node

    @property
    def has_window(self) -> bool:
        return self.offset != 0 or self.size is not None

    # --- permissions: forwarded to the file ----------------------------------
    def apply_permissions(self, perm: Perm, shared: Perm) -> None:
        edge = self.child_edges.get("file")
        if edge is not None:
            edge.node.update(edge, perm, shared)

    # --- introspection ----------------------------------------------------------
    def getlength(self) -> int:
        if self.size is not None:
            return self.size
        return max(0, self.file.getlength() - self.offset)

    def filename(self) -> str:
        if not self.has_window:
            return self.file.filename()
        desc: dict[str, Any] = {"driver": "raw", "offset": self.offset}
        if self.size is not None:
            desc["size"] = self.size
        desc["file"] = {"driver": self.file.driver, "filename": self.file.filename()}
        return "json:" + json.dumps(desc)

    def host_fd(self) -> int | str:
        if self.has_window:
            return "the raw node exposes a window (offset/size) of its file"
        fd = self.file.host_fd()
        return "passthrough needs a raw node on a plain file" if isinstance(fd, str) else fd

    def refresh_length(self) -> int:
        self.file.refresh_length()
        return self.getlength()

    async def allocated_size(self) -> int:
        return await self.file.allocated_size()

    # --- I/O ------------------------------------------------------------------------
    def _inside(self, offset: int, length: int) -> int:
        """How many of [offset, offset+length) lie inside a fixed window."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        if self.size is None:
            return length
        return max(0, min(length, self.size - offset))

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        n = self._inside(offset, length)
        if n == length:
            return await self.file.read(self.offset + offset, length)
        data = bytearray(length)  # the part past the window reads as zeroes
        if n:
            data[:n] = await self.file.read(self.offset + offset, n)
        return data

    def map_now(self, offset: int, length: int, *, write: bool = False) -> list[Extent] | None:
        """The file's extents for the same bytes (at the window's offset);
        None for a range that leaves the window (read() zero-fills that part)."""
        if self._inside(offset, length) != length:
            return None
        if write and self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        return self.file.map_now(self.offset + offset, length, write=write)

    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        if self._inside(offset, length) != length:
            raise OSError(errno.ENOSPC, "write past the end of the raw window")

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        await self.file.write(self.offset + offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_write(offset, length)
        await self.file.write_zeroes(self.offset + offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        n = self._inside(offset, length)
        if n and not self.read_only:
            await self.file.discard(self.offset + offset, n)

    async def flush(self) -> None:
        await self.file.flush()

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        self.check_resize_allowed()
        await self.file.truncate(self.offset + size, prealloc=prealloc, exact=exact)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        end = self.getlength()
        if offset >= end:
            return BlockStatus(Status.ZERO | Status.EOF, max(length, 1))
        n = min(length, end - offset)
        st = await self.file.block_status(self.offset + offset, n)
        count = min(st.length, n)
        status = st.status & ~Status.EOF
        if offset + count >= end:
            status |= Status.EOF
        return BlockStatus(status, count)


def _check_window(offset: int, size: int | None, real: int) -> None:
    """A raw node's window (offset, size) over a file of `real` bytes, with QEMU's texts."""
    if offset > real:
        raise BlockError(f"Offset ({offset}) cannot be greater than size of the containing file ({real})")
    if size is not None and real - offset < size:
        raise BlockError(
            f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
            f" actual size of the containing file ({real})"
        )
    if size is not None and size % SECTOR:
        raise BlockError(f"Specified size is not multiple of {SECTOR}")
