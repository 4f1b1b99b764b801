"""A reserve of file descriptors, so that QMP always has room (issue 16).

Exports, nodes and NBD clients each hold file descriptors. Were they
allowed to take the last ones, a new QMP client could not even be accepted,
and nobody could send `quit` or delete an export. Commands that open new
files, and new NBD clients, are refused while fewer than RESERVE
descriptors are free; what is left serves QMP clients and clean-up.
"""

from __future__ import annotations

import os
import resource

from exportd.errors import QMPError

RESERVE = 32
# commands that open files, sockets or /dev/fuse (a few descriptors each)
OPENING_COMMANDS = frozenset({
    "block-export-add", "nbd-server-add", "blockdev-add", "blockdev-create", "nbd-server-start",
    "blockdev-snapshot-sync", "drive-backup", "drive-mirror", "object-add",
})
# what one such command may open at most, beyond the reserve
ONE_COMMAND = 8


def open_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own


def limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def free() -> int:
    return limit() - open_count()


def check_room(command: str) -> None:
    """QMPError when `command` could eat into the reserve."""
    left = free()
    if left < RESERVE + ONE_COMMAND:
        raise QMPError(f"Too many open files: {command} refused with {left} of {limit()} file descriptors "
                       f"left; exportd keeps {RESERVE} for QMP clients (raise the limit: ulimit -n)")


def room_for_client() -> bool:
    """Whether a new NBD client may be served (else it is closed at once)."""
    return free() >= RESERVE + 1
