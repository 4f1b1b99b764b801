"""FUSE passthrough: backing files the kernel reads and writes itself.

A file system that opens its file with a backing id (OpenReply.backing_id)
lets the kernel serve that file's I/O from the backing file directly
(kernel >= 6.9, CAP_SYS_ADMIN). The ids come from ioctls on the /dev/fuse fd
(FUSE_DEV_IOC_BACKING_OPEN/CLOSE) and die with it.
"""

from __future__ import annotations

import fcntl
import logging

from . import abi

log = logging.getLogger(__name__)


class PassthroughUnavailable(OSError):
    """The kernel or our privileges refuse FUSE passthrough; serve reads ourselves."""


class BackingFiles:
    """The backing ids registered on one /dev/fuse fd."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[int] = []  # none or one, usually: a list is the smallest

    def open(self, dev_fd: int, fd: int) -> int:
        """Register `fd` as a backing file; returns its id. Raises
        PassthroughUnavailable when the kernel refuses (e.g. EPERM without
        CAP_SYS_ADMIN)."""
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(dev_fd, abi.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as e:
            raise PassthroughUnavailable(
                e.errno, f"FUSE_DEV_IOC_BACKING_OPEN refused: {e.strerror}"
            ) from None
        self._ids.append(backing_id)
        return backing_id

    def close(self, dev_fd: int, backing_id: int) -> None:
        if backing_id in self._ids:
            self._ids.remove(backing_id)
            _backing_close(dev_fd, backing_id)

    def close_all(self, dev_fd: int) -> None:
        for backing_id in self._ids:
            _backing_close(dev_fd, backing_id)
        self._ids.clear()


def _backing_close(dev_fd: int, backing_id: int) -> None:
    if dev_fd < 0:
        return
    try:
        fcntl.ioctl(
            dev_fd, abi.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")), True
        )
    except OSError as e:
        log.debug("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", backing_id, e)
