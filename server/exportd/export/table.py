"""ExportTable: the daemon's exports (block-export-add/del, query-block-exports).

The daemon owns one table (`daemon.exports`). Error texts are QEMU's, verbatim.
An add that fails leaves nothing behind: no id, no mountpoint reservation, no
node permission, no mount.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from exportd.errors import QMPError
from exportd.export import export_type
from exportd.export.base import BlockExport
from exportd.objects import iothread_exists

if TYPE_CHECKING:
    from exportd.block.node import BlockNode

log = logging.getLogger(__name__)

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9\-._]*\Z")

SHUTDOWN_GRACE_S = 5.0  # requests in flight get this long before being cancelled


class ExportTable:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self._exports: list[BlockExport] = []  # newest first, as QEMU's QLIST_INSERT_HEAD
        self._pending: set[str] = set()  # ids whose add is under way
        # what export types reserve across the daemon, key -> export (a FUSE
        # export's "fuse:<canonical mountpoint>"; an NBD export name...): held
        # from the type's check, through an add under way, until deletion
        self.claims: dict[str, BlockExport] = {}

    # --- lookup ---------------------------------------------------------------
    def find(self, export_id: str) -> BlockExport | None:
        for exp in self._exports:
            if exp.id == export_id:
                return exp
        return None

    def __iter__(self):  # newest first
        return iter(list(self._exports))

    def __len__(self) -> int:
        return len(self._exports)

    # --- block-export-add -------------------------------------------------------
    async def add(self, options: dict[str, Any]) -> BlockExport:
        export_id = options["id"]
        if not _ID_RE.match(export_id):
            raise QMPError("Invalid block export id")
        if export_id in self._pending or self.find(export_id) is not None:
            raise QMPError(f"Block export id '{export_id}' is already in use")
        cls = export_type(options.get("type", ""))
        if cls is None:
            raise QMPError("No driver found for the requested export type")
        node = self._lookup_node(options["node-name"])
        # an iothread must exist, as in QEMU; then one loop serves all the same
        iothread = options.get("iothread")
        if iothread is not None and not iothread_exists(self.daemon, iothread):
            raise QMPError(f'iothread "{iothread}" not found')
        writable = bool(options.get("writable", False))
        if writable and node.read_only:
            raise QMPError("Cannot export read-only node as writable")

        self._pending.add(export_id)
        try:
            exp = cls(
                self,
                export_id,
                node,
                writable=writable,
                writethrough=bool(options.get("writethrough", False)),
            )
            try:
                await exp.start(options)
            except BaseException:
                await exp.release_node()
                self._drop_claims(exp)
                raise
            self._exports.insert(0, exp)
            return exp
        finally:
            self._pending.discard(export_id)

    def _lookup_node(self, name: str) -> BlockNode:
        graph = getattr(self.daemon, "graph", None)
        node = None
        if graph is not None:
            try:
                node = graph.get(name)
            except (KeyError, LookupError):
                node = None
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{name}'")
        return node

    # --- block-export-del ---------------------------------------------------------
    def delete(self, export_id: str, mode: str = "safe") -> BlockExport:
        exp = self.find(export_id)
        if exp is None:
            raise QMPError(f"Export '{export_id}' is not found")
        if not exp.user_owned:
            raise QMPError(f"Export '{export_id}' is already shutting down")
        if mode == "safe" and exp.refcount > 1:
            exp.drop_departed()  # a client that hung up a moment ago is not a user
            if exp.refcount > 1:
                raise QMPError(f"export '{export_id}' still in use")
        exp.request_shutdown(cancel_requests=(mode == "hard"))
        return exp

    # --- query-block-exports --------------------------------------------------------
    def query(self) -> list[dict[str, Any]]:
        return [exp.info() for exp in self._exports]

    # --- called by BlockExport once it is gone ---------------------------------------
    def _remove(self, exp: BlockExport) -> None:
        if exp in self._exports:
            self._exports.remove(exp)
        self._drop_claims(exp)

    def _drop_claims(self, exp: BlockExport) -> None:
        for key, holder in list(self.claims.items()):
            if holder is exp:
                del self.claims[key]

    # --- quit / signals -------------------------------------------------------------
    async def shutdown_all(self) -> None:
        """Shut every export down as block-export-del does (one
        BLOCK_EXPORT_DELETED each) and wait until all are gone. Requests still
        in flight after a grace period are cancelled."""
        exports = list(self._exports)
        for exp in exports:
            exp.request_shutdown()
        pending = [asyncio.ensure_future(exp.wait_deleted()) for exp in exports]
        if not pending:
            return
        done, rest = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
        if rest:
            for exp in exports:
                if not exp.deleted.is_set():
                    log.warning("export %s: cancelling requests still in flight", exp.id)
                    exp.cancel_requests()
            done, rest = await asyncio.wait(rest, timeout=SHUTDOWN_GRACE_S)
            for fut in rest:
                fut.cancel()
