"""getfd and closefd: name a descriptor sent to the monitor with SCM_RIGHTS,
or close a named one. The work is in exportd.monitor.fdpass."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from exportd.commands import command
from exportd.errors import QMPError
from exportd.monitor.fdpass import current_monitor_fds


def _monitor_fds() -> Any:
    fds = current_monitor_fds.get()
    if fds is None:  # only a monitor connection can carry descriptors
        raise QMPError("No file descriptor supplied via SCM_RIGHTS")
    return fds


@command("getfd")
async def getfd(daemon: Any, args: dict[str, Any]) -> None:
    fds = _monitor_fds()
    fd = fds.take_received()
    if fd is None:
        raise QMPError("No file descriptor supplied via SCM_RIGHTS")
    name = args["fdname"]
    if name[:1].isdigit():  # a number would read as an inherited descriptor
        with contextlib.suppress(OSError):
            os.close(fd)
        raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
    fds.named.put(name, fd)


@command("closefd")
async def closefd(daemon: Any, args: dict[str, Any]) -> None:
    current = current_monitor_fds.get()
    if current is None:
        raise QMPError(f"File descriptor named '{args['fdname']}' not found")
    current.named.close(args["fdname"])
