"""Helpers shared by the block tests."""

from __future__ import annotations

from pathlib import Path


def make_image(path: Path, size: int, pattern: bool = True) -> bytearray:
    """A file of `size` bytes with a position-dependent pattern; returns its model."""
    data = bytearray((i * 7 + i // 251) & 0xFF for i in range(size)) if pattern else bytearray(size)
    path.write_bytes(data)
    return data
