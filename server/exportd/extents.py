"""Extents: where the bytes of a range live, for the synchronous data path.

A block node answers `map_now(offset, length)` (exportd.block.node) with a
list of extents that together cover the range in order, or None when it
cannot say without waiting (the caller then awaits read()/write()). The FUSE
layer turns a read's extents into a reply (splice, preadv or zeroes:
exportd.fuse.readreply); the export writes a write's extents in place
(exportd.export.io).

An extent is a plain tuple, (fd, offset, length, never_blocks), because the
hot path builds one per request and a tuple costs least:

- fd >= 0: `length` bytes of host file `fd` at `offset`. The descriptor
  belongs to the node; use it only until the call returns.
- fd == ZEROES: `length` bytes that read as zeroes (no file behind them).
  In a write mapping it means the bytes are dropped (null-co).
- never_blocks: reading (or writing) these pages can never wait for a disk
  (tmpfs, ramfs), so it may be done inline and spliced. When False the
  caller may still try a nonblocking read (preadv with RWF_NOWAIT, a
  page-cache hit) and falls back to awaiting read() when it would block.
"""

from __future__ import annotations

FD, OFFSET, LENGTH, NEVER_BLOCKS = 0, 1, 2, 3
ZEROES = -1

Extent = tuple[int, int, int, bool]


def zeroes(length: int) -> Extent:
    return (ZEROES, 0, length, True)


def total_length(extents: list[Extent]) -> int:
    n = 0
    for e in extents:
        n += e[LENGTH]
    return n


def shifted(extents: list[Extent] | None, delta: int) -> list[Extent] | None:
    """`extents` with host offsets moved by `delta` (zero extents unchanged)."""
    if extents is None or not delta:
        return extents
    return [(fd, off + delta if fd >= 0 else off, n, nb) for fd, off, n, nb in extents]
