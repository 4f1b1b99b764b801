"""Format probing (QEMU's bdrv_probe_all): which format driver an image file
is in, asked of every format driver's `probe(head)` on the class.

Synchronous file I/O: call it from a worker thread when on the event loop.
"""

from __future__ import annotations

from exportd.block import DRIVERS, known_drivers
from exportd.errors import BlockError

PROBE_BYTES = 2048  # QEMU's BLOCK_PROBE_BUF_SIZE


def probe_format(path: str) -> str:
    """The format driver that is surest about the file at `path` (raw, which
    takes anything, when no other claims it). Raises OSError when the file
    cannot be read."""
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
    known_drivers()  # every driver module loaded: each declares its probe
    best, score = "raw", 0
    for name, cls in sorted(DRIVERS.items()):
        if not cls.is_format:
            continue
        s = cls.probe(head)
        if s > score:
            best, score = name, s
    return best


def probe_backing_format(path: str) -> str:
    """probe_format() for a backing file named by an image without its format."""
    try:
        return probe_format(path)
    except OSError as e:
        raise BlockError(f"Could not open backing file '{path}': {e.strerror}") from None
