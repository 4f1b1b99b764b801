"""The internal snapshot table (read only: snapshots are kept, never changed)."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

from exportd.block.qcow2 import header as hdr
from exportd.errors import BlockError

SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra data, id, name
MAX_SNAPSHOT_TABLE = 64 * 1024 * 1024  # QEMU's limit
MAX_SNAPSHOT_EXTRA = 1024

Reader = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]


async def read_snapshot_table(pread: Reader, h: hdr.Header, file_end: int) -> tuple[list[dict[str, Any]], int]:
    """Parse and check the snapshot table; returns (snapshots, table length in bytes)."""
    if not h.nb_snapshots:
        return [], 0
    cmask = h.cluster_size - 1
    if h.nb_snapshots > hdr.MAX_SNAPSHOTS:
        raise BlockError("Too many snapshots")
    if h.snapshots_offset & cmask or h.snapshots_offset == 0:
        raise BlockError("Invalid snapshot table offset")
    limit = min(file_end - h.snapshots_offset, MAX_SNAPSHOT_TABLE)
    if limit < SNAPSHOT_ENTRY.size:
        raise BlockError("Snapshot table offset invalid: points outside the image file")
    buf: bytes | bytearray | memoryview = b""

    async def need(n: int) -> None:
        """Have the first n bytes of the table in buf (read in growing pieces)."""
        nonlocal buf
        if n > limit:
            raise BlockError("Snapshot table exceeds the image file or its size limit")
        if len(buf) < n:
            buf = await pread(h.snapshots_offset, min(limit, max(n, 2 * len(buf), 65536)))

    out: list[dict[str, Any]] = []
    pos = 0
    for _ in range(h.nb_snapshots):
        await need(pos + SNAPSHOT_ENTRY.size)
        l1_off, l1_size, id_len, name_len, date_s, date_ns, vm_clock, vm_state, extra = \
            SNAPSHOT_ENTRY.unpack_from(buf, pos)
        if extra > MAX_SNAPSHOT_EXTRA:
            raise BlockError("Too much extra metadata in snapshot table entry")
        end = pos + SNAPSHOT_ENTRY.size + extra + id_len + name_len
        await need(end)
        p = pos + SNAPSHOT_ENTRY.size + extra
        sid = bytes(buf[p : p + id_len]).decode("utf-8", "replace")
        name = bytes(buf[p + id_len : end]).decode("utf-8", "replace")
        disk_size = h.size
        if extra >= 16:
            disk_size = struct.unpack_from(">Q", buf, pos + 48)[0]
        if l1_off & cmask or l1_size * 8 > hdr.MAX_L1_BYTES or \
                (l1_size and (l1_off == 0 or l1_off + l1_size * 8 > file_end)):
            raise BlockError(f"Snapshot L1 table of '{name}' is invalid")
        out.append({"id": sid, "name": name, "l1-offset": l1_off, "l1-size": l1_size,
                    "date-sec": date_s, "date-nsec": date_ns, "vm-clock-nsec": vm_clock,
                    "vm-state-size": vm_state, "disk-size": disk_size})
        pos = (end + 7) & ~7
    return out, pos
