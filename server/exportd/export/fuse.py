"""FuseExport: a block node presented as a raw file through FUSE.

QEMU's FUSE export (block/export/fuse.c) on exportd's own FUSE layer
(exportd.fuse) and block layer. What differs from QEMU, on purpose:

- The mountpoint check never stats our own mount from the loop (see
  exportd.export.mountpoint), so `mnt.raw` vs `/abs/mnt.raw` is an error,
  not a deadlock. An export that is still shutting down on the same
  mountpoint is waited for instead of refused.
- A stale exportd mount left on the mountpoint by a crashed daemon is
  cleaned before mounting.
- An export unmounted from outside shuts itself down (one
  BLOCK_EXPORT_DELETED) instead of lingering.
- passthrough=auto|on|off: a raw export of a plain file can let the kernel
  serve read/write itself (FUSE_PASSTHROUGH).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from exportd.block.node import BlockNode, Perm
from exportd.errors import QMPError
from exportd.export import mountpoint as mp
from exportd.export.base import BlockExport
from exportd.export.fuse_file import ExportedFile

log = logging.getLogger(__name__)

HOLDER_WAIT_S = 10.0  # how long an add waits for a shutting-down export on its mountpoint
UNMOUNT_TIMEOUT_S = 15.0


class FuseExport(BlockExport):
    type = "fuse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mountpoint = ""  # as the user gave it
        self.canonical = ""  # realpath(parent) + last component
        self.growable = False
        self.allow_other = False
        self.passthrough = False
        self.passthrough_reason = ""  # why not, when passthrough is off
        self.backing_id = 0
        self._backing_fd = -1
        self.session: Any = None
        self.mount_dev: tuple[int, int] | None = None
        self.file = ExportedFile(self)

    # --- start ----------------------------------------------------------------
    async def start(self, options: dict[str, Any]) -> None:
        self.mountpoint = options["mountpoint"]
        self.growable = bool(options.get("growable", False))
        allow_other = options.get("allow-other", "auto")
        passthrough = options.get("passthrough", "auto")

        # permissions first, as QEMU (blk_insert_bs, then RESIZE if growable)
        perm = Perm.CONSISTENT_READ
        if self.writable:
            perm |= Perm.WRITE
        if self.growable:
            perm |= Perm.RESIZE
        self.attach_node(perm, Perm.ALL)

        await self._claim_mountpoint()
        self.file = ExportedFile(self)  # mode depends on writable only; fresh per start
        use_passthrough = self._passthrough_wanted(passthrough)

        if allow_other == "auto":
            try:
                await self._mount(allow_other=True, passthrough=use_passthrough)
            except QMPError:
                await self._mount(allow_other=False, passthrough=use_passthrough)
        else:
            await self._mount(allow_other=(allow_other == "on"), passthrough=use_passthrough)

        try:
            await self._setup_passthrough(passthrough, use_passthrough)
        except BaseException:
            await self._unmount()
            raise
        self.mount_dev = self._find_mount_dev()

    async def _claim_mountpoint(self) -> None:
        path = self.mountpoint
        try:
            canonical = await mp.in_thread(lambda: mp.canonical_path(path))
        except OSError as e:
            raise QMPError(f"Failed to stat '{path}': {os.strerror(e.errno or errno.EIO)}") from None
        table = self.table
        holder = table.mountpoints.get(canonical)
        if holder is not None and holder.shutting_down:
            # being deleted: its mountpoint is free once it is unmounted
            try:
                await asyncio.wait_for(holder.wait_deleted(), HOLDER_WAIT_S)
            except TimeoutError:
                pass
            holder = table.mountpoints.get(canonical)
        if holder is not None:
            raise QMPError(f"There already is a FUSE export on '{path}'")
        entries = mp.mounts_at(canonical)
        if entries and mp.is_fuse(entries[-1]) and entries[-1].dev in self._our_devs():
            raise QMPError(f"There already is a FUSE export on '{path}'")
        table.mountpoints[canonical] = self  # reserved from here on
        self.canonical = canonical
        try:
            if entries and mp.is_fuse(entries[-1]):
                await self._clean_stale(canonical)
            await mp.check_regular_file(path)
        except BaseException:
            table.mountpoints.pop(canonical, None)
            raise

    def _our_devs(self) -> set[tuple[int, int]]:
        return {
            e.mount_dev
            for e in self.table
            if isinstance(e, FuseExport) and e.mount_dev is not None and e is not self
        }

    async def _clean_stale(self, canonical: str) -> None:
        """A dead exportd mount on the mountpoint (its daemon was killed) is
        removed first; live mounts of other processes are left alone."""
        try:
            from exportd.fuse import mount as fuse_mount
        except ImportError:
            return
        clean = getattr(fuse_mount, "clean_stale_mount", None) or getattr(
            fuse_mount, "clean_stale", None
        )
        if clean is None:
            return
        try:
            result = clean(canonical)
            if asyncio.iscoroutine(result):
                await result
        except Exception as e:  # noqa: BLE001 - the stat below reports what is wrong
            log.warning("export %s: cleaning stale mount on %s failed: %s", self.id, canonical, e)

    def _find_mount_dev(self) -> tuple[int, int] | None:
        entries = [e for e in mp.mounts_at(self.canonical) if mp.is_fuse(e)]
        return entries[-1].dev if entries else None

    async def _mount(self, *, allow_other: bool, passthrough: bool) -> None:
        from exportd.fuse.session import FuseSession

        try:
            self.session = await FuseSession.start(
                self.file,
                self.mountpoint,
                fsname=f"exportd:{self.id}",
                read_only=not self.writable,
                allow_other=allow_other,
                passthrough=passthrough,
            )
        except QMPError:
            raise
        except Exception as e:  # noqa: BLE001 - mount errors become the command's error
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise QMPError(f"Failed to mount FUSE session to export: {detail}") from None
        self.allow_other = allow_other

    async def _unmount(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            await asyncio.wait_for(session.close(), UNMOUNT_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            log.exception("export %s: unmount of %s failed", self.id, self.mountpoint)

    # --- passthrough ------------------------------------------------------------
    def _passthrough_source(self) -> tuple[BlockNode | None, str]:
        """The file node whose descriptor the kernel may use, or why not."""
        node = self.node
        if node.driver == "raw":
            offset = getattr(node, "offset", 0) or node.options.get("offset", 0)
            has_size = getattr(node, "size_limited", None)
            if has_size is None:
                has_size = "size" in node.options
            if offset or has_size:
                return None, "the raw node exposes a window (offset/size) of its file"
            node = node.children.get("file")
            if node is None:
                return None, "the raw node has no file child"
        if node.driver != "file":
            return None, f"passthrough needs a raw export of a plain file (node is '{node.driver}')"
        if _node_fd(node) is None:
            return None, "the file node has no descriptor to pass"
        if self.writable and not self.growable:
            return None, (
                "the kernel would let writes past the end grow the image; "
                "make the export growable or read-only"
            )
        return node, ""

    def _passthrough_wanted(self, mode: str) -> bool:
        if mode == "off":
            self.passthrough_reason = "passthrough=off"
            return False
        source, reason = self._passthrough_source()
        if source is None:
            if mode == "on":
                raise QMPError(f"Cannot use passthrough for export '{self.id}': {reason}")
            self.passthrough_reason = reason
            return False
        return True

    async def _setup_passthrough(self, mode: str, wanted: bool) -> None:
        if not wanted:
            return
        source, _ = self._passthrough_source()
        assert source is not None
        try:
            fd = _reopen(_node_fd(source), self.writable, source, self.writethrough)
        except OSError as e:
            return self._passthrough_failed(mode, f"cannot reopen the image: {e.strerror}")
        try:
            backing_id = self.session.open_backing(fd)
            if asyncio.iscoroutine(backing_id):
                backing_id = await backing_id
        except Exception as e:  # noqa: BLE001 - kernel/privilege refusal: fall back or fail
            os.close(fd)
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return self._passthrough_failed(mode, detail or type(e).__name__)
        if not backing_id:
            os.close(fd)
            return self._passthrough_failed(mode, "the kernel did not accept the backing file")
        self._backing_fd = fd
        self.backing_id = int(backing_id)
        self.passthrough = True
        self.passthrough_reason = ""

    def _passthrough_failed(self, mode: str, reason: str) -> None:
        if mode == "on":
            raise QMPError(f"Cannot use passthrough for export '{self.id}': {reason}")
        log.info("export %s: passthrough not available (%s), serving in the daemon", self.id, reason)
        self.passthrough_reason = reason

    def _close_backing(self) -> None:
        if self.backing_id and self.session is not None:
            closer = getattr(self.session, "close_backing", None)
            if closer is not None:
                try:
                    closer(self.backing_id)
                except Exception:  # noqa: BLE001
                    log.debug("export %s: closing backing id failed", self.id, exc_info=True)
        self.backing_id = 0
        if self._backing_fd >= 0:
            os.close(self._backing_fd)
            self._backing_fd = -1

    # --- what the file handlers ask ------------------------------------------------
    def current_length(self) -> int:
        """The size clients see. Under writable passthrough the kernel writes
        the file itself, so its size is the truth (fstat of our own backing
        descriptor: a local file, never our mount)."""
        if self.passthrough and self.writable and self._backing_fd >= 0:
            try:
                return os.fstat(self._backing_fd).st_size
            except OSError:
                pass
        return self.node.getlength()

    def length_changed(self) -> None:
        """Hook after a truncate (nothing cached here yet)."""

    def session_ended(self, reason: str) -> None:
        if reason == "closed" or not self.user_owned:
            return
        log.warning("export %s: FUSE session ended (%s); shutting the export down", self.id, reason)
        self.request_shutdown(cancel_requests=True)

    # --- shutdown --------------------------------------------------------------------
    async def _delete(self) -> None:
        self._close_backing()  # before the unmount: the session closes the id
        await self._unmount()

    def extra_info(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "writable": self.writable,
            "growable": self.growable,
            "allow-other": self.allow_other,
            "passthrough": self.passthrough,
        }


def _node_fd(node: BlockNode) -> int | None:
    for name in ("fd", "_fd"):
        fd = getattr(node, name, None)
        if isinstance(fd, int) and fd >= 0:
            return fd
    return None


def _reopen(fd: int | None, writable: bool, node: BlockNode, writethrough: bool) -> int:
    """A descriptor of our own on the node's file, for the kernel to use."""
    if fd is None:
        raise OSError(errno.EBADF, "no descriptor")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if getattr(node, "cache_direct", False):
        flags |= os.O_DIRECT
    if writethrough:
        flags |= os.O_DSYNC
    return os.open(f"/proc/self/fd/{fd}", flags)
