"""Raw image files for tests, with the bytes they hold to compare against."""

from __future__ import annotations

import random
from pathlib import Path


def make_image(path: Path, size: int, *, seed: int = 1, sparse: bool = False) -> bytes:
    """A raw image of `size` bytes of pseudo-random data (or empty and sparse)."""
    if sparse:
        with open(path, "wb") as f:
            f.truncate(size)
        return bytes(size)
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def make_pattern_image(path: Path, size: int, pattern: bool = True) -> bytearray:
    """A file of `size` bytes with a position-dependent pattern; returns its model."""
    data = bytearray((i * 7 + i // 251) & 0xFF for i in range(size)) if pattern else bytearray(size)
    path.write_bytes(data)
    return data
