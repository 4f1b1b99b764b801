"""The daemon object every command handler receives.

It is the monitors' CommandExecutor (exportd.monitor.executor): they hand it
every command and it gives them its events.

Members others rely on (keep them stable):
  daemon.loop        the one asyncio loop (uvloop when installed)
  daemon.schema      exportd.qapi.schema.Schema, loaded from schema/
  daemon.graph       exportd.block.graph.BlockGraph
  daemon.exports     exportd.export.table.ExportTable
  daemon.emit_event(name, data)  an event to every negotiated client of
                     every monitor, with a timestamp
  await daemon.shutdown(reason)  emit SHUTDOWN, shut exports down, finish
                     the jobs, graph.close_all(), stop the monitors; the
                     process then exits
  await daemon.execute(name, args)  schema validation + the command's
                     handler: the one path for QMP and the command line
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from typing import Any

from exportd import __version__, commands, fdreserve, jobs, systemd
from exportd.aio.settle import settled
from exportd.block.graph import BlockGraph
from exportd.commands.control import OFFERED_CAPABILITIES
from exportd.errors import CommandNotFound, QMPError
from exportd.export.hostio import quiesced
from exportd.export.table import ExportTable
from exportd.monitor.server import Monitor
from exportd.monitor.session import event_message
from exportd.qapi.schema import schema

log = logging.getLogger(__name__)

# The QEMU release whose QMP exportd speaks (clients read this to decide
# which commands and arguments exist).
QEMU_VERSION = {"major": 9, "minor": 2, "micro": 0}

# At shutdown, a command still running on another monitor gets this long.
SHUTDOWN_COMMAND_WAIT_S = 10.0
# Commands that add no bitmap or threshold and change no node, edge or
# window before they return (a cancelled job's graph changes come later,
# from its task, and move the export's node), and those that must not wait
# for a FUSE ring thread's write (quit, a delete): they run without
# export.hostio.quiesced(), as queries do.
_CHANGES_NOTHING = frozenset({
    "qmp_capabilities", "qom-get", "qom-list", "qom-list-types", "qom-list-properties",
    "device-list-properties", "quit", "block-export-del", "job-cancel", "block-job-cancel",
    "job-pause", "job-resume", "block-job-pause", "block-job-resume", "block-job-set-speed",
})


class Daemon:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.monitors: list[Monitor] = []
        self.command_lock = asyncio.Lock()  # commands run one at a time, as under QEMU's BQL
        self.stopped = asyncio.Event()
        self.pidfile: str | None = None
        self._pidfile_fd: int | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self.schema = schema()
        commands.load_all()
        self.graph = BlockGraph(self)
        self.exports = ExportTable(self)
        self.nbd_server: Any = None  # exportd.nbd.server.NbdServer while nbd-server-start holds

    # --- QMP --------------------------------------------------------------------
    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version_info(), "capabilities": list(OFFERED_CAPABILITIES)}}

    def version_info(self) -> dict[str, Any]:
        return {"qemu": dict(QEMU_VERSION), "package": f"exportd {__version__}"}

    def check_arguments(self, name: str, args: dict[str, Any]) -> None:
        """Validate only (an already negotiated qmp_capabilities is checked, then refused)."""
        self.schema.validate(name, args)

    async def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Validate `args` against schema/ and run the command's handler."""
        args = {} if args is None else args
        cmd = commands.COMMANDS.get(name)
        if cmd is None and name not in self.schema.commands:
            raise CommandNotFound(f"The command {name} has not been found")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("qmp: %s %s", name, _brief(args))
        self.schema.validate(name, args)
        if cmd is None:
            raise QMPError(f"Command {name} is not implemented yet")
        if name in fdreserve.OPENING_COMMANDS:
            fdreserve.check_room(name)
        async with self.command_lock:
            if name in _CHANGES_NOTHING or name.startswith("query-"):
                result = await cmd.handler(self, args)
            else:
                async with quiesced():  # no FUSE ring thread write may slip past it
                    result = await cmd.handler(self, args)
            await settled()  # e.g. the kernel dropped an export's cached size
            return result

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        message = event_message(name, data)
        for monitor in list(self.monitors):
            monitor.broadcast(message)

    # --- monitors -----------------------------------------------------------------
    async def add_monitor(self, path: str, *, pretty: bool = False, name: str = "", fd: int | None = None,
                          mode: int = 0o600) -> Monitor:
        monitor = Monitor(self, path, pretty=pretty, name=name)
        await monitor.start(fd, mode)
        self.monitors.append(monitor)
        return monitor

    # --- pidfile --------------------------------------------------------------------
    def write_pidfile(self, path: str) -> None:
        """Create and lock the pidfile (a second daemon with it fails)."""
        import fcntl

        # QEMU's texts (qemu_write_pidfile), after its "cannot create PID file: "
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise QMPError(f"cannot create PID file: Could not create '{path}': "
                           f"{os.strerror(e.errno or 0)}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise QMPError(f"cannot create PID file: Cannot lock pid file: {os.strerror(e.errno or 0)}") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.pidfile, self._pidfile_fd = os.path.abspath(path), fd

    def _remove_pidfile(self) -> None:
        if self.pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.pidfile)
            self.pidfile = None
        if self._pidfile_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfile_fd)
            self._pidfile_fd = None

    # --- shutdown ---------------------------------------------------------------------
    @property
    def shutting_down(self) -> bool:
        return self._shutdown_task is not None

    def request_shutdown(self, reason: str) -> None:
        """Start shutting down soon (after the current reply has been queued)."""
        if self._shutdown_task is None:
            self._shutdown_task = self.loop.create_task(self._shutdown(reason))

    async def shutdown(self, reason: str | None) -> None:
        """Shut everything down; reason None: no SHUTDOWN event (failed startup)."""
        if self._shutdown_task is None:
            self._shutdown_task = self.loop.create_task(self._shutdown(reason))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, reason: str | None) -> None:
        systemd.notify("STOPPING=1")
        # let a command running on another monitor finish first
        locked = False
        try:
            await asyncio.wait_for(self.command_lock.acquire(), SHUTDOWN_COMMAND_WAIT_S)
            locked = True
        except TimeoutError:
            log.warning("a command is still running; shutting down anyway")
        try:
            # QEMU's order (iotest 308): SHUTDOWN first, then one BLOCK_EXPORT_DELETED per export
            if reason is not None:
                self.emit_event("SHUTDOWN", {"guest": False, "reason": reason})
            try:
                await self.exports.shutdown_all()
            except Exception:
                log.exception("shutting the exports down failed")
            from exportd.nbd.server import shutdown_hook
            await shutdown_hook(self)  # listeners closed, their socket files removed
            await jobs.finish_all(self)  # jobs cancelled, waited for (QEMU: job_cancel_sync_all)
            try:
                await self.graph.close_all()
            except Exception:
                log.exception("closing the block nodes failed")
            for monitor in list(self.monitors):
                await monitor.close()
            self._remove_pidfile()
        finally:
            if locked:
                self.command_lock.release()
            self.stopped.set()


def _brief(args: dict[str, Any]) -> str:
    """A command's arguments for a log line: bounded (a 28 MiB message
    must not become a 28 MiB line)."""
    text = json.dumps(_shortened(args), default=str)
    return text if len(text) <= 400 else text[:400] + "..."


def _shortened(value: Any, depth: int = 0) -> Any:
    """`value` with long strings and containers cut, before json.dumps sees
    it (dumping a 28 MiB string only to cut it holds the loop for 0.4 s)."""
    if isinstance(value, str):
        return value if len(value) <= 200 else f"{value[:200]}...({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _shortened(v, depth + 1) for k, v in itertools.islice(value.items(), 20)} if depth < 6 else "{...}"
    if isinstance(value, list):
        return [_shortened(v, depth + 1) for v in value[:20]] if depth < 6 else "[...]"
    return value
