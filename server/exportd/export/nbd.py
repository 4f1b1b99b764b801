"""NbdExport: a block node served by the daemon's NBD server (QEMU's
nbd/server.c export, block-export-add type=nbd).

The export registers its name with the running server; clients that chose
it (NBD_OPT_GO / EXPORT_NAME) each hold a reference, so a safe
block-export-del says "still in use" while one is connected, as in QEMU.
Shutting down drops every client of the export at once.

Unlike QEMU, CAN_MULTI_CONN is advertised for writable exports too: every
connection reaches the same node on the one loop, and a flush on any of them
flushes the node, which is what the flag promises.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from exportd.block import bitmaps
from exportd.block.bitmap_actions import bitmap_of
from exportd.block.bitmaps import DirtyBitmap, Use
from exportd.block.chain import filtered_or_backing
from exportd.block.node import BlockNode, BlockStatus, Holes, Perm, Status
from exportd.errors import QMPError
from exportd.export import register_export_type
from exportd.export.base import BlockExport
from exportd.nbd import protocol as P
from exportd.nbd.server import server_of

if TYPE_CHECKING:
    from exportd.nbd.connection import Connection

log = logging.getLogger(__name__)

PREFERRED_BLOCK = 4096


@register_export_type
class NbdExport(BlockExport):
    type = "nbd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = ""
        self.description = ""
        self.allocation_depth = False
        self.multi_conn = True
        self.clients: set[Connection] = set()
        self.bitmaps: dict[str, DirtyBitmap] = {}  # context name -> the dirty bitmap it shows
        self._server: Any = None
        self._data_cache: tuple[BlockNode, int, int, int] | None = None  # node, start, end, Holes.epoch
        self._lookup = asyncio.Lock()  # block status lookups for the cache, one at a time

    async def start(self, options: dict[str, Any]) -> None:
        server = server_of(self.table.daemon)
        if server is None:
            raise QMPError("NBD server not running")
        name = options.get("name", options["node-name"])
        if len(name.encode()) > P.MAX_STRING:
            raise QMPError(f"export name '{name}' too long")
        description = options.get("description", "")
        if len(description.encode()) > P.MAX_STRING:
            raise QMPError(f"description '{description}' too long")
        exported = self._find_bitmaps(options.get("bitmaps", []))
        if name in server.exports or ("nbd:" + name) in self.table.claims:
            raise QMPError(f"NBD server already has export named '{name}'")
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else 0)
        self.attach_node(Perm(perm), Perm.ALL)
        self.name = name
        self.description = description
        self.allocation_depth = bool(options.get("allocation-depth", False))
        for bm in exported:
            bm.busy = True  # until the export goes (QEMU: no change while a client may read it)
            self.bitmaps[P.CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bm.name] = bm
        self.table.claims["nbd:" + name] = self
        server.exports[name] = self
        self._server = server

    def _find_bitmaps(self, wanted: list[str | dict[str, str]]) -> list[DirtyBitmap]:
        """The `bitmaps` option, with QEMU's lookups and texts: a name is
        looked for on the node, then down its filters and backing chain (a
        fleecing overlay exports its source's bitmap); {node, name} names
        a node."""
        found: list[DirtyBitmap] = []
        for item in wanted:
            if isinstance(item, dict):
                bm = bitmap_of(self.table.daemon.graph, item["node"], item["name"])
            else:
                node: BlockNode | None = self.node
                bm = None
                while node is not None and bm is None:
                    bm = bitmaps.find(node, item)
                    bm_node, node = node, filtered_or_backing(node)
                if bm is None:
                    raise QMPError(f"Bitmap '{item}' is not found")
                if not self.writable and not bm_node.read_only and bm.enabled:
                    raise QMPError(f"Enabled bitmap '{item}' incompatible with readonly export")
            bm.check(Use.ALLOW_RO)
            found.append(bm)
        return found

    # --- what the connections ask ---------------------------------------------------
    def block_sizes(self) -> tuple[int, int, int]:
        align = max(1, getattr(self.node, "request_alignment", 1))
        return align, max(PREFERRED_BLOCK, align), P.MAX_PAYLOAD

    def meta_contexts(self) -> list[str]:
        out = [P.CONTEXT_BASE_ALLOCATION]
        if self.allocation_depth:
            out.append(P.CONTEXT_QEMU_ALLOCATION_DEPTH)
        return out + list(self.bitmaps)

    def fast_zero(self) -> bool:
        """Whether zeroing is cheaper than writing zeroes (FAST_ZERO's promise):
        a node with its own write_zeroes, not the generic write of a buffer."""
        return type(self.node).write_zeroes is not BlockNode.write_zeroes

    # --- block status cache (as QEMU's block-status cache keeps one) -----------------
    # The last range block_status called data (not zero), for sparse reads and
    # base:allocation: asking again costs a SEEK_HOLE walk per request on a
    # big file. A stale entry is harmless: a range called data is sent as
    # data, and reported allocated, which is always correct (proto.md: a hole
    # may be reported as data); holes are never cached. Anything that may
    # make a hole anywhere (Holes: trims and zeroing through any export or
    # job, a truncate, a graph change) and a resize drop it.
    def known_data(self, offset: int) -> int:
        """How many bytes from `offset` are known to be data (0: ask)."""
        c = self._data_cache
        if c is None or c[0] is not self.node or not c[1] <= offset < c[2] or c[3] != Holes.epoch:
            return 0
        return c[2] - offset

    async def data_status(self, offset: int, length: int) -> tuple[int, BlockStatus | None]:
        """(n, None): n bytes from `offset` are data, from the cache or a
        lookup to the export's end that fills it; (0, status): the node's
        block status at `offset` (at least `length` bytes asked), not data.
        One lookup at a time: nbdcopy's first requests (4 connections x 64)
        would each walk the whole file otherwise."""
        known = self.known_data(offset)
        if known:
            return known, None
        async with self._lookup:
            known = self.known_data(offset)
            if known:
                return known, None
            epoch = Holes.epoch  # a hole made during the lookup makes its answer stale
            st = await self.node.block_status(offset, max(length, self.current_length() - offset))
            if st.status & Status.DATA and not st.status & Status.ZERO and st.length > 0:
                self.remember_data(offset, st.length, epoch)
                return st.length, None
            return 0, st

    def remember_data(self, offset: int, length: int, epoch: int) -> None:
        self._data_cache = (self.node, offset, offset + length, epoch)

    def forget_data(self) -> None:
        """A trim or zeroing through this export may make holes: ask again."""
        self._data_cache = None

    def length_changed(self) -> None:
        self._data_cache = None

    def drop_departed(self) -> None:
        """Clients that have hung up stop holding the export (see
        Connection.depart)."""
        for conn in list(self.clients):
            if conn.peer_gone():
                conn.depart()

    # --- life cycle -------------------------------------------------------------------
    def _unregister(self) -> None:
        server = self._server
        if server is not None and server.exports.get(self.name) is self:
            del server.exports[self.name]

    def _request_shutdown(self) -> None:
        # no new clients; those connected go now (QEMU: client_close on each)
        self._unregister()
        for conn in list(self.clients):
            conn.close()

    def cancel_requests(self) -> None:
        for conn in list(self.clients):
            conn.close()

    async def _delete(self) -> None:
        self._unregister()
        for bm in self.bitmaps.values():
            bm.busy = False
        self.bitmaps = {}

    def extra_info(self) -> dict[str, Any]:
        return {"name": self.name, "writable": self.writable, "clients": len(self.clients)}
