"""BlockExport: the life cycle every export type shares (QEMU's block/export/export.c).

An export starts with one reference, held by the user (`user_owned`).
Requests in flight take extra references (`request()`), so the export cannot
vanish under them. `request_shutdown()` stops new requests, calls the type's
`_request_shutdown()` hook and drops the user's reference; it is idempotent.
When the last reference goes, deletion runs as a task on the loop:

    1. `_delete()`       type-specific teardown (the FUSE export unmounts here)
    2. release the node  (detach this export's permissions from it)
    3. remove from the export table
    4. emit BLOCK_EXPORT_DELETED {"id": ...}

Only after step 3 is the id free for a new export, so a client that waits for
the event can reuse the id (and the mountpoint) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from exportd.block.node import BlockNode, Edge, Perm
from exportd.export.io import ExportIO

if TYPE_CHECKING:
    from exportd.export.table import ExportTable

log = logging.getLogger(__name__)


class BlockExport(ABC):
    """One export of one block node, held through an edge (so that a job
    replacing the node moves the export with it). Export types subclass it
    and register with @register_export_type (exportd.export)."""

    type: ClassVar[str]  # QAPI BlockExportType: "fuse", "nbd", ...
    growable = False  # whether writes past the end grow the node (FUSE's option)

    def __init__(
        self,
        table: ExportTable,
        export_id: str,
        node: BlockNode,
        *,
        writable: bool,
        writethrough: bool,
    ) -> None:
        self.table = table
        self.id = export_id
        # The node this export serves: the one its edge points at. Kept as a
        # plain attribute (read on every request) that edge_moved() updates
        # when the graph moves the edge.
        self.node = node
        self.writable = writable
        self.writethrough = writethrough
        self.refcount = 1
        self.user_owned = True
        self.edge: Edge | None = None
        self.io = ExportIO(self)
        self.deleted = asyncio.Event()
        self._delete_task: asyncio.Task[None] | None = None

    # --- identity ---------------------------------------------------------
    def describe(self) -> str:
        """How permission conflicts on the node name this user (QEMU's words
        for an export's anonymous BlockBackend)."""
        return "an unnamed block device"

    @property
    def shutting_down(self) -> bool:
        return not self.user_owned

    def current_length(self) -> int:
        """The size clients see."""
        return self.node.getlength()

    def length_changed(self) -> None:  # noqa: B027 (optional hook)
        """Hook after a truncate (nothing cached here yet)."""

    # --- creation -----------------------------------------------------------
    def attach_node(self, perm: Perm, shared: Perm = Perm.ALL) -> None:
        self.edge = self.node.attach(self, perm, shared, role="root")

    async def release_node(self) -> None:
        edge = self.edge
        if edge is not None:
            self.edge = None
            await self.table.daemon.graph.release(edge)

    def drop_departed(self) -> None:  # noqa: B027 (optional hook)
        """Let go of clients that have hung up but whose end the loop has not
        processed yet (an NBD export's); before a safe delete counts users."""

    def refuse_move(self, edge: Edge, new: BlockNode) -> str | None:
        """Why this export cannot follow its node to `new` (None: it can)."""
        return None

    def edge_moved(self, edge: Edge, old: BlockNode) -> None:
        """The graph moved this export from `old` to another node (a
        snapshot, commit or mirror pivot); requests go on on the new one."""
        log.info("export %s: now on node %s (was %s)", self.id, edge.node.node_name, old.node_name)
        self.node = edge.node

    @abstractmethod
    async def start(self, options: dict[str, Any]) -> None:
        """Type-specific setup from validated block-export-add options. On
        failure raise QMPError after undoing everything it did (the caller
        releases the node)."""

    # --- references ---------------------------------------------------------
    def ref(self) -> None:
        assert self.refcount > 0, "ref on a dead export"
        self.refcount += 1

    def unref(self) -> None:
        assert self.refcount > 0, "unref below zero"
        self.refcount -= 1
        if self.refcount == 0:
            self._delete_task = asyncio.get_running_loop().create_task(
                self._run_delete(), name=f"export-delete-{self.id}"
            )

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Hold a reference for one request in flight. New requests after
        request_shutdown() fail with EIO instead of keeping the export alive."""
        if not self.user_owned:
            raise OSError(errno.EIO, "export is shutting down")
        self.ref()
        try:
            yield
        finally:
            self.unref()

    # --- shutdown -----------------------------------------------------------
    def request_shutdown(self, *, cancel_requests: bool = False) -> None:
        """Stop taking requests and drop the user's reference (QEMU's
        blk_exp_request_shutdown). With cancel_requests (block-export-del
        mode=hard), requests in flight are cancelled too, so a request stuck
        on a hung backend cannot keep the export alive."""
        if not self.user_owned:
            return
        try:
            self._request_shutdown()
        except Exception:  # noqa: BLE001 - shutdown must go on
            log.exception("export %s: request_shutdown hook failed", self.id)
        self.user_owned = False
        if cancel_requests:
            self.cancel_requests()
        self.unref()

    def cancel_requests(self) -> None:
        """Type hook: make requests in flight end now (mode=hard)."""
        return None

    def _request_shutdown(self) -> None:
        """Type hook: stop accepting new requests (no I/O wait allowed here)."""
        return None

    async def _delete(self) -> None:
        """Type hook: final teardown once no reference is left (unmount...)."""
        return None

    async def _run_delete(self) -> None:
        try:
            await self._delete()
        except Exception:  # noqa: BLE001 - the export must still go away
            log.exception("export %s: teardown failed", self.id)
        finally:
            try:
                await self.release_node()
            except Exception:  # noqa: BLE001 - the export must still go away
                log.exception("export %s: releasing its node failed", self.id)
            self.table._remove(self)
            self.table.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": self.id})
            self.deleted.set()

    async def wait_deleted(self) -> None:
        await self.deleted.wait()

    # --- introspection --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """One query-block-exports entry (QEMU's members plus type extras)."""
        return {
            "id": self.id,
            "type": self.type,
            "node-name": self.node.node_name,
            "shutting-down": self.shutting_down,
            **self.extra_info(),
        }

    def extra_info(self) -> dict[str, Any]:
        return {}
