"""Seeded random file operations, run in a child process on a FUSE mount and,
with the same seed, on a raw reference copy.

    python fileops.py PATH SEED COUNT fuse|ref

On the mount, zeroing ops are fallocate(PUNCH_HOLE|KEEP_SIZE) and
fallocate(ZERO_RANGE); on the reference they are plain zero writes (same
bytes), so the two files must end equal whatever the filesystem below."""

from __future__ import annotations

import ctypes
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]

LENGTHS = [1, 511, 512, 4096, 5000, 65536, 70000, 300_000, 1 << 20]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(e)}")


def ops(seed: str, size: int, count: int) -> list[tuple[str, int, int]]:
    """(kind, offset, length) with kind write|punch|zero|fsync."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        r = rng.random()
        off = rng.randrange(0, size)
        if rng.random() < 0.4:
            off -= off % 4096  # aligned starts hit whole clusters more often
        ln = min(rng.choice(LENGTHS), size - off)
        kind = "write" if r < 0.6 else "punch" if r < 0.75 else "zero" if r < 0.9 else "fsync"
        out.append((kind, off, ln))
    return out


def apply(path: str, seed: str, count: int, target: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        data_rng = random.Random(f"data-{seed}")
        for kind, off, ln in ops(seed, size, count):
            if kind == "write":
                data = data_rng.randbytes(ln)
                assert os.pwrite(fd, data, off) == ln
            elif kind == "fsync":
                os.fsync(fd)
            elif target == "ref":
                assert os.pwrite(fd, bytes(ln), off) == ln
            elif kind == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
            else:
                fallocate(fd, FALLOC_FL_ZERO_RANGE, off, ln)
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    apply(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
