"""Image locking with OFD byte-range locks, compatible with QEMU's file-posix.

Protocol (QEMU block/file-posix.c, shared by qemu-img, qemu-io,
qemu-storage-daemon and exportd, so they all see each other): for each
permission bit i (consistent read = 0, write = 1, write unchanged = 2,
resize = 3), an opener holds a shared (F_RDLCK) OFD lock on

  byte 100 + i  while it uses the permission ("I use write"),
  byte 200 + i  while it does not share it   ("nobody else may write").

Before taking a permission an opener tests byte 200 + i for a lock held
through another open file description, and before refusing to share one it
tests byte 100 + i. Locks held through our own descriptor never conflict.
As QEMU does, new locks are taken first and tested afterwards, so two
openers racing both fail rather than both succeeding.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from exportd.block.node import Perm, perm_name
from exportd.errors import BlockError

PERM_BASE = 100
SHARED_BASE = 200

# (permission, bit index i) in QEMU's BLK_PERM_* order
PERM_BITS: tuple[tuple[Perm, int], ...] = (
    (Perm.CONSISTENT_READ, 0),
    (Perm.WRITE, 1),
    (Perm.WRITE_UNCHANGED, 2),
    (Perm.RESIZE, 3),
)

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding); l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("@hhqqi4x")

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def _flock(fd: int, cmd: int, ltype: int, byte: int) -> tuple[int, int, int, int, int]:
    arg = _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0)
    return _FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))


def lock_byte(fd: int, byte: int) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)


def unlock_byte(fd: int, byte: int) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)


def byte_locked_by_others(fd: int, byte: int) -> bool:
    """True when another open file description holds any lock on `byte`."""
    ltype = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)[0]
    return ltype != fcntl.F_UNLCK


def probe(fd: int) -> bool:
    """Whether OFD locks work on this file (False on file systems without them)."""
    try:
        byte_locked_by_others(fd, PERM_BASE)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    return True


class ImageLock:
    """The lock bytes one open file description holds for its users."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.perm = Perm(0)  # permissions whose "use" byte we hold
        self.unshared = Perm(0)  # permissions whose "don't share" byte we hold

    def change(self, perm: Perm, shared: Perm) -> None:
        """Hold the locks for (perm, shared), or raise BlockError with the old
        locks kept when another process conflicts."""
        unshared = Perm.ALL & ~shared
        old = (self.perm, self.unshared)
        try:
            # take the union first, check, then drop what is no longer needed
            self._set(self.perm | perm, self.unshared | unshared)
            self._check(perm, unshared)
        except BlockError:
            self._set_quietly(*old)
            raise
        self._set(perm, unshared)

    def release(self) -> None:
        self._set_quietly(Perm(0), Perm(0))

    def _set(self, perm: Perm, unshared: Perm) -> None:
        for bit, i in PERM_BITS:
            for want, have, base in (
                (perm & bit, self.perm & bit, PERM_BASE),
                (unshared & bit, self.unshared & bit, SHARED_BASE),
            ):
                try:
                    if want and not have:
                        lock_byte(self.fd, base + i)
                    elif have and not want:
                        unlock_byte(self.fd, base + i)
                except OSError as e:
                    raise BlockError(f"Failed to lock byte {base + i}: {os.strerror(e.errno or 0)}") from e
                if base == PERM_BASE:
                    self.perm = (self.perm & ~bit) | (perm & bit)
                else:
                    self.unshared = (self.unshared & ~bit) | (unshared & bit)

    def _set_quietly(self, perm: Perm, unshared: Perm) -> None:
        try:
            self._set(perm, unshared)
        except BlockError:
            pass

    def _check(self, perm: Perm, unshared: Perm) -> None:
        for bit, i in PERM_BITS:
            if perm & bit and byte_locked_by_others(self.fd, SHARED_BASE + i):
                self._fail(f'Failed to get "{perm_name(bit)}" lock')
            if unshared & bit and byte_locked_by_others(self.fd, PERM_BASE + i):
                self._fail(f'Failed to get shared "{perm_name(bit)}" lock')

    def _fail(self, message: str) -> None:
        raise BlockError(f"{message}\nIs another process using the image [{self.filename}]?")

    def holders(self) -> dict[str, list[str]]:
        """Which permissions other processes use / refuse to share (diagnostics)."""
        used, unshared = [], []
        for bit, i in PERM_BITS:
            if byte_locked_by_others(self.fd, PERM_BASE + i):
                used.append(perm_name(bit))
            if byte_locked_by_others(self.fd, SHARED_BASE + i):
                unshared.append(perm_name(bit))
        return {"used": used, "unshared": unshared}
