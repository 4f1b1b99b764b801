"""qcow2 on a live graph: blockdev-reopen (read-only <-> read-write, discard
and cache options) and the backing file name in the header (QEMU's
qcow2_reopen_* and qcow2_change_backing_file). A mixin of Qcow2Node."""

from __future__ import annotations

import logging
from typing import Any

from exportd.block.node import Edge, Perm
from exportd.block.qcow2 import header as hdr
from exportd.errors import BlockError

log = logging.getLogger(__name__)

# members exportd applies live (the L2 cache size, discard passing) or
# ignores at open as well (QEMU's cache tuning, overlap checks, lazy refcounts)
QCOW2_REOPEN_MEMBERS = frozenset({
    "l2-cache-size", "cache-size", "pass-discard-request", "pass-discard-snapshot",
    "pass-discard-other", "discard-no-unref", "overlap-check", "refcount-cache-size",
    "l2-cache-entry-size", "cache-clean-interval", "lazy-refcounts",
})


class Qcow2Reopen:
    # state and methods of Qcow2Node this mixin uses
    header: hdr.Header
    read_only: bool
    node_name: str

    def child_perm(self, role: str, read_only: bool) -> tuple[Perm, Perm] | None:
        """What this node needs on its child `role` (the graph asks when the
        node's read-only changes); the same rule as at open."""
        if role != "file":
            return None
        perm = Perm.CONSISTENT_READ if read_only else Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        shared = Perm.ALL if self.force_share else Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED  # type: ignore[attr-defined]
        return perm, shared

    def child_replaced(self, role: str, edge: Edge) -> None:
        """blockdev-reopen gave this node a new `file` (a filter inserted or
        removed): the image is read through the new edge from now on."""
        if role == "file":
            self._file_edge = edge  # type: ignore[attr-defined]
            self.io.edge = edge  # type: ignore[attr-defined]

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """Read-only -> read-write: the image must be writable as at open (no
        corrupt or dirty bit); commit then builds the metadata set, clears
        the autoclear bits as open does and marks the persistent bitmaps in
        use again. Read-write -> read-only: the persistent bitmaps are stored
        and everything cached is written back and flushed now, before the
        file goes read-only; commit makes the bitmaps readonly."""
        going_rw = self.read_only and not read_only
        going_ro = read_only and not self.read_only
        if going_rw:
            h = self.header
            if self.corrupt or h.incompatible_features & hdr.INCOMPAT_CORRUPT:  # type: ignore[attr-defined]
                raise BlockError("qcow2: Image is corrupt; cannot be opened read/write")
            if h.incompatible_features & hdr.INCOMPAT_DIRTY:
                raise BlockError(
                    "qcow2: image has the dirty bit set (lazy refcounts); repair it with "
                    "'qemu-img check -r all' or open it read-only"
                )
        elif going_ro:
            async with self._lock:  # type: ignore[attr-defined]
                await self.store_bitmaps()  # type: ignore[attr-defined]
            try:
                await self.flush()  # type: ignore[attr-defined]
            except OSError as e:
                raise BlockError(f"Could not flush before going read-only: {e.strerror or e}") from None
        discard_unmap = options.get("discard") in ("unmap", "on")
        pass_discard = bool(options.get("pass-discard-request", discard_unmap))
        l2_bytes = options.get("l2-cache-size", options.get("cache-size"))

        async def commit() -> None:
            self._discard_unmap = discard_unmap
            self._pass_discard = pass_discard
            if l2_bytes is not None:
                self.l2cache.max_tables = max(2, l2_bytes // self.cs)  # type: ignore[attr-defined]
            if going_rw:
                await self._become_writable()
            if going_ro:
                self.bitmaps_now_readonly()  # type: ignore[attr-defined]

        async def abort() -> None:
            if going_ro:  # stored with IN_USE clear, and still written to
                try:
                    async with self._lock:  # type: ignore[attr-defined]
                        await self._mark_in_use()  # type: ignore[attr-defined]
                except BlockError as e:
                    log.warning("qcow2 %s: %s", self.node_name, e)

        return commit, abort

    async def _become_writable(self) -> None:
        # the file is writable (children commit first); what open does for rw
        self.io.end = max(self.io.end, self.io.node.getlength())  # type: ignore[attr-defined]
        self.meta_clusters.clear()  # type: ignore[attr-defined]
        self._build_meta_set()  # type: ignore[attr-defined]
        try:
            await self._bitmaps_for_writing()  # type: ignore[attr-defined]
            await self.bitmaps_now_writable()  # type: ignore[attr-defined]
        except (OSError, BlockError) as e:
            # as QEMU: not fatal, the bitmaps stay readonly
            log.error("%s: %s", self.node_name, e)

    async def set_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Point the image header at another backing file (`None`: no backing
        file), with its format in the backing-format extension (`None`: no
        extension), as QEMU's bdrv_change_backing_file. The header, its
        extensions and the name are rewritten in one write inside the first
        cluster, then flushed; the open backing node does not change."""
        if self.read_only:
            raise BlockError("Cannot change the backing file of a read-only node")
        if fmt is not None and filename is None:
            raise BlockError("Backing format cannot be used without backing file")
        name = filename.encode() if filename else b""
        if len(name) > hdr.MAX_BACKING_NAME:
            raise BlockError("Backing file name too long")
        async with self._lock:  # type: ignore[attr-defined]
            h = self.header
            exts = [e for e in h.extensions if e.type != hdr.EXT_BACKING_FORMAT]
            if fmt is not None:
                exts.insert(0, hdr.Extension(hdr.EXT_BACKING_FORMAT, fmt.encode()))
            old = (h.extensions, h.backing_file, h.backing_file_offset, h.backing_file_size)
            h.extensions, h.backing_file = exts, filename or None
            try:
                # the whole first cluster (it holds nothing else), as QEMU writes it
                await self.io.write(0, hdr.pack_first_cluster(h, self.cs))  # type: ignore[attr-defined]
                await self.io.flush()  # type: ignore[attr-defined]
            except (OSError, BlockError):
                h.extensions, h.backing_file, h.backing_file_offset, h.backing_file_size = old
                raise
