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
- io-uring=auto|on|off (the name of QEMU's option): requests come through
  FUSE over io_uring when the kernel allows it (fuse/uring.py). The default
  is off (measured slower at QD1 here), or EXPORTD_FUSE_IO_URING when set
  (the test suite runs the export tiers in both modes with it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from exportd.aio.settle import settle_later
from exportd.aio.threads import in_own_thread
from exportd.block.bitmaps import recording_below
from exportd.block.node import Perm
from exportd.errors import QMPError
from exportd.export import mountpoint as mp
from exportd.export import register_export_type
from exportd.export.base import BlockExport
from exportd.export.fuse_file import ExportedFile
from exportd.fuse.mount import is_mount_root
from exportd.mountinfo import MountEntry, mounts_at, read_mountinfo

log = logging.getLogger(__name__)

IO_URING_DEFAULT_ENV = "EXPORTD_FUSE_IO_URING"
HOLDER_WAIT_S = 10.0  # how long an add waits for a shutting-down export on its mountpoint
UNMOUNT_TIMEOUT_S = 15.0
STALE_CLEAN_TIMEOUT_S = 30.0


@register_export_type
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
        self.io_uring = False  # FUSE over io_uring serves the requests
        self.io_uring_reason = ""  # why not, when it was wanted
        self.backing_id = 0
        self._backing_fd = -1
        # files open by passthrough (all, and those open for writing): the
        # kernel serves them without the daemon until they are released
        self.passthrough_open = 0
        self.passthrough_writers = 0
        self.session: Any = None
        self._close_task: asyncio.Task[None] | None = None
        self.mount_dev: tuple[int, int] | None = None
        self.file = ExportedFile(self)
        self._invalidations: set[asyncio.Task[None]] = set()  # cache drops under way (kept referenced)

    # --- start ----------------------------------------------------------------
    async def start(self, options: dict[str, Any]) -> None:
        self.mountpoint = options["mountpoint"]
        self.growable = bool(options.get("growable", False))
        allow_other = options.get("allow-other", "auto")
        passthrough = options.get("passthrough", "auto")
        io_uring = options.get("io-uring") or _default_io_uring()

        # permissions first, as QEMU (blk_insert_bs, then RESIZE if growable)
        perm = Perm.CONSISTENT_READ
        if self.writable:
            perm |= Perm.WRITE
        if self.growable:
            perm |= Perm.RESIZE
        self.attach_node(perm, Perm.ALL)

        await self._claim_mountpoint()
        use_passthrough = self._passthrough_wanted(passthrough)

        if allow_other == "auto":
            try:
                await self._mount(allow_other=True, passthrough=use_passthrough, io_uring=io_uring)
            except QMPError as e:
                if e.args and str(e.args[0]).startswith(IO_URING_ERROR):
                    raise
                await self._mount(allow_other=False, passthrough=use_passthrough, io_uring=io_uring)
        else:
            await self._mount(
                allow_other=(allow_other == "on"), passthrough=use_passthrough, io_uring=io_uring
            )

        try:
            await self._setup_passthrough(passthrough, use_passthrough)
        except BaseException:
            await self._unmount()
            raise
        self.mount_dev = self._find_mount_dev()

    async def _claim_mountpoint(self) -> None:
        """Check the mountpoint and reserve it in the export table. One worker
        thread computes the canonical path and stats the path (a stat that
        reaches one of our own mounts is answered by this loop meanwhile);
        the loop thread itself only reads the table and /proc/self/mountinfo."""
        path = self.mountpoint
        canonical, st, mounted = await self._probe(path)
        table = self.table
        holder = table.claims.get(_claim(canonical))
        if holder is not None and holder.shutting_down:
            # being deleted: its mountpoint is free once it is unmounted
            try:
                await asyncio.wait_for(holder.wait_deleted(), HOLDER_WAIT_S)
            except TimeoutError:
                pass
            holder = table.claims.get(_claim(canonical))
            if holder is None:
                canonical, st, mounted = await self._probe(path)  # what is there now
        if holder is not None:
            raise QMPError(f"There already is a FUSE export on '{path}'")
        entries = mounts_at(canonical, mounted)
        top = entries[-1] if entries and entries[-1].is_fuse else None
        if top is not None and top.dev in self._our_devs():
            raise QMPError(f"There already is a FUSE export on '{path}'")
        table.claims[_claim(canonical)] = self  # reserved from here on
        self.canonical = canonical
        try:
            if top is not None and isinstance(st, OSError) and st.errno in mp.DEAD_MOUNT_ERRNOS:
                # a dead exportd mount left by a killed daemon: clean, look again
                await self._clean_stale(canonical)
                canonical, st, _ = await self._probe(path)
            mp.check_regular_file_stat(path, st)
        except BaseException:
            table.claims.pop(_claim(self.canonical), None)
            raise

    @staticmethod
    async def _probe(path: str) -> tuple[str, os.stat_result | OSError, list[MountEntry]]:
        """(canonical path, stat result or error, mount table), from one
        worker thread: the mountinfo read and parse stay off the loop."""
        def probe() -> tuple[str, os.stat_result | OSError, list[MountEntry]]:
            canonical, st = mp.probe_path(path)
            if is_mount_root(canonical) is False:
                return canonical, st, []  # nothing mounted there: skip the mount table
            return canonical, st, read_mountinfo()

        try:
            return await in_own_thread(probe, timeout=mp.PATH_TIMEOUT_S)
        except OSError as e:  # the worker thread timed out: a hung mount
            raise QMPError(f"Failed to stat '{path}': {os.strerror(e.errno or errno.EIO)}") from None

    def _our_devs(self) -> set[tuple[int, int]]:
        return {
            e.mount_dev
            for e in self.table
            if isinstance(e, FuseExport) and e.mount_dev is not None and e is not self
        }

    async def _clean_stale(self, canonical: str) -> None:
        """A dead exportd mount on the mountpoint (its daemon was killed) is
        removed first; live mounts of other processes are left alone."""
        from exportd.fuse import mount as fuse_mount

        try:
            cleaned = await in_own_thread(
                lambda: fuse_mount.clean_stale_mounts([canonical]), timeout=STALE_CLEAN_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001 - the stat below reports what is wrong
            log.warning("export %s: cleaning stale mount on %s failed: %s", self.id, canonical, e)
            return
        if cleaned:
            log.info("export %s: removed stale mount(s) on %s", self.id, canonical)

    def _find_mount_dev(self) -> tuple[int, int] | None:
        # FUSE superblocks are anonymous devices: major 0, minor = connection
        connection = getattr(self.session, "connection", None)
        if connection is not None:
            return (0, connection)
        entries = [e for e in mounts_at(self.canonical) if e.is_fuse]
        return entries[-1].dev if entries else None

    async def _mount(self, *, allow_other: bool, passthrough: bool, io_uring: str) -> None:
        from exportd.fuse.session import FuseSession, IoUringUnavailable

        try:
            self.session = await FuseSession.start(
                self.file,
                self.mountpoint,
                fsname=f"exportd:{self.id}",
                read_only=not self.writable,
                allow_other=allow_other,
                passthrough=passthrough,
                io_uring=io_uring,
            )
        except QMPError:
            raise
        except IoUringUnavailable as e:
            raise QMPError(f"{IO_URING_ERROR} for export '{self.id}': {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - mount errors become the command's error
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise QMPError(f"Failed to mount FUSE session to export: {detail}") from None
        self.allow_other = allow_other
        self.io_uring = self.session.io_uring
        self.io_uring_reason = self.session.io_uring_reason
        if io_uring == "auto" and self.io_uring_reason:
            log.info("export %s: not using io_uring (%s)", self.id, self.io_uring_reason)

    async def _unmount(self) -> None:
        """Unmount and end the session (idempotent, shared by all callers)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close_session())
        await asyncio.shield(self._close_task)

    async def _close_session(self) -> None:
        self._close_backing()  # before the session goes: it owns the device fd
        session = self.session
        if session is None:
            return
        try:
            await asyncio.wait_for(session.close(), UNMOUNT_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            log.exception("export %s: unmount of %s failed", self.id, self.mountpoint)
        self.session = None

    def cancel_requests(self) -> None:
        # closing the session unmounts and cancels every handler in flight:
        # reads stop at once; writes, zeroing and truncates finish their I/O
        # first (fuse_file._to_the_end); each then drops its reference
        if self.session is not None and self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close_session())

    # --- passthrough ------------------------------------------------------------
    def _passthrough_source(self) -> tuple[int | None, str]:
        """The host descriptor the kernel may use directly, or why not."""
        fd = self.node.host_fd()
        if isinstance(fd, str):
            return None, fd
        if self.writable and not self.growable:
            return None, (
                "the kernel would let writes past the end grow the image; "
                "make the export growable or read-only"
            )
        if self.writable and self.writethrough:
            return None, "writethrough needs the daemon to flush after every write"
        if self.writable and (watched := recording_below(self.node)) is not None:
            return None, f"dirty bitmaps of node '{watched}' must see every write"
        return fd, ""

    def passthrough_still_safe(self) -> bool:
        """Whether a new open may still be handed to the kernel: a job or a
        dirty bitmap that came after the mount must see the writes."""
        return self.passthrough and self._passthrough_source()[0] is not None

    def passthrough_opened(self, writer: bool) -> None:
        self.passthrough_open += 1
        self.passthrough_writers += writer

    def passthrough_released(self, writer: bool) -> None:
        self.passthrough_open -= 1
        self.passthrough_writers -= writer

    def refuse_recording(self, node_name: str) -> str | None:
        """Why a dirty bitmap of `node_name` (this export's node or one below
        it) cannot start recording: files already open by passthrough are
        written by the kernel, which no bitmap sees."""
        if self.passthrough_writers:
            return (f"Export '{self.id}' has {self.passthrough_writers} file(s) open for writing through "
                    f"FUSE passthrough, whose writes the dirty bitmaps of node '{node_name}' would miss; "
                    "close them first, or use passthrough=off")
        return None

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
        host_fd, _ = self._passthrough_source()
        try:
            fd = _reopen(host_fd, self.writable)
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

    def edge_moved(self, edge: Any, old: Any) -> None:
        super().edge_moved(edge, old)
        if self.passthrough:
            # the backing file is the old node's: later opens go through the daemon
            self._close_backing()
            self.passthrough = False
            self.passthrough_reason = f"the export moved from node '{old.node_name}'"
        # the kernel may hold the old node's size (attributes cached for up
        # to a second) and pages (shared mmap): have it drop them
        self._drop_kernel_cache()

    def node_resized(self) -> None:
        """The node (or one below it) was resized by someone else (block_resize)."""
        self._drop_kernel_cache()

    def _drop_kernel_cache(self) -> None:
        session = self.session
        if session is not None:
            task = asyncio.get_running_loop().create_task(session.invalidate_cache())
            self._invalidations.add(task)
            task.add_done_callback(self._invalidations.discard)
            settle_later(task)  # the command's reply waits for it

    def refuse_move(self, edge: Any, new: Any) -> str | None:
        # the kernel reads and writes the old image file itself for the files
        # open by passthrough: they cannot follow (later opens would)
        if self.passthrough_open:
            return (f"Export '{self.id}' has {self.passthrough_open} file(s) open through FUSE passthrough "
                    f"on its image file and cannot move to '{new.node_name}' until they are closed")
        return None

    # --- what the file handlers ask ------------------------------------------------
    def current_length(self) -> int:
        """The size clients see. Under writable passthrough the kernel writes
        the file itself and may grow it: the node re-reads its size."""
        if self.passthrough and self.writable:
            return self.node.refresh_length()
        return self.node.getlength()

    def session_ended(self, reason: str) -> None:
        if reason == "closed" or not self.user_owned:
            return
        log.warning("export %s: FUSE session ended (%s); shutting the export down", self.id, reason)
        self.request_shutdown(cancel_requests=True)

    # --- shutdown --------------------------------------------------------------------
    async def _delete(self) -> None:
        await self._unmount()

    def extra_info(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "writable": self.writable,
            "growable": self.growable,
            "allow-other": self.allow_other,
            "passthrough": self.passthrough,
            "io-uring": self.io_uring,
        }


IO_URING_ERROR = "Cannot use io_uring"


def _default_io_uring() -> str:
    """The io-uring mode of exports that do not give one: off, because on
    this kind of machine the ring was measured slower than /dev/fuse at
    4 KiB QD1 (bench/README.md, Levers); EXPORTD_FUSE_IO_URING changes it."""
    mode = os.environ.get(IO_URING_DEFAULT_ENV, "")
    return mode if mode in ("auto", "on", "off") else "off"


def _claim(canonical: str) -> str:
    """The export table key that reserves a mountpoint."""
    return "fuse:" + canonical


def _reopen(fd: int | None, writable: bool) -> int:
    """A descriptor of our own on the node's file, for the kernel to use."""
    if fd is None:
        raise OSError(errno.EBADF, "no descriptor")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    path = f"/proc/self/fd/{fd}"
    try:
        # The kernel reads through this file for every passthrough request;
        # without atime updates each read is a little cheaper (bench/README.md).
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner or CAP_FOWNER
        return os.open(path, flags)
