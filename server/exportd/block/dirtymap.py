"""One flag per `granularity` bytes of a node: which chunks a mirror still
has to copy, and the data of a dirty bitmap (exportd.block.bitmaps).

In memory a flag is a byte (0 or 1), so marking, counting and finding runs
are C-speed bytearray operations (16 Ki flags per GiB at 64 KiB); on disk
and in QEMU's debug hash a flag is a bit, least significant bit first."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator


class DirtyMap:
    def __init__(self, length: int, granularity: int) -> None:
        self.granularity = granularity
        self.length = length
        self._flags = bytearray(-(-length // granularity))
        self.count = 0  # dirty chunks

    def _chunks(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granularity
        return offset // g, min(-(-(offset + length) // g), len(self._flags))

    def mark(self, offset: int, length: int) -> int:
        """Mark the chunks that [offset, offset + length) touches; returns
        how many bytes became dirty that were not."""
        if length <= 0 or offset >= self.length:
            return 0
        a, b = self._chunks(offset, length)
        fresh = self._flags.count(0, a, b)
        if fresh:
            self._flags[a:b] = b"\x01" * (b - a)
            self.count += fresh
        return fresh * self.granularity

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        """Clear the chunks [offset, offset + length) covers (chunk-aligned);
        everything without arguments."""
        if length is None:
            length = self.length - offset
        a, b = self._chunks(offset, length)
        dirty = (b - a) - self._flags.count(0, a, b)
        if dirty:
            self._flags[a:b] = bytes(b - a)
            self.count -= dirty

    def is_dirty(self, offset: int) -> bool:
        return bool(self._flags[offset // self.granularity])

    def next_run(self, start: int, max_bytes: int) -> tuple[int, int] | None:
        """The first dirty run at or after byte `start` (wrapping around),
        at most `max_bytes` long: (offset, length), or None when clean."""
        if not self.count:
            return None
        g = self.granularity
        i = self._flags.find(1, start // g)
        if i < 0:
            i = self._flags.find(1)
        j = self._flags.find(0, i, i + max(1, max_bytes // g))
        if j < 0:
            j = min(len(self._flags), i + max(1, max_bytes // g))
        offset = i * g
        return offset, min(j * g, self.length) - offset

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, dirty) runs covering [offset, offset + length),
        clipped to it and to the map's length."""
        end = self.length if length is None else min(self.length, offset + length)
        g, flags = self.granularity, self._flags
        pos = offset
        while pos < end:
            i = pos // g
            flag = flags[i]
            j = flags.find(1 - flag, i + 1, -(-end // g))
            stop = end if j < 0 else min(end, j * g)
            yield pos, stop - pos, bool(flag)
            pos = stop

    def dirty_bytes(self) -> int:
        return self.count * self.granularity

    # --- whole-map operations (dirty bitmaps) -----------------------------------
    def resize(self, length: int) -> None:
        n = -(-length // self.granularity)
        if n < len(self._flags):
            self.count -= (len(self._flags) - n) - self._flags.count(0, n)
            del self._flags[n:]
        else:
            self._flags.extend(bytes(n - len(self._flags)))
        self.length = length

    def copy(self) -> DirtyMap:
        other = DirtyMap(0, self.granularity)
        other.length, other._flags, other.count = self.length, bytearray(self._flags), self.count
        return other

    def restore(self, saved: DirtyMap) -> None:
        """Become `saved` again (an aborted clear or merge)."""
        self._flags[:] = saved._flags
        self.count = saved.count

    def merge(self, other: DirtyMap) -> None:
        """Mark everything `other` (same length, any granularity) marks."""
        if not other.count:
            return
        if other.granularity == self.granularity:
            merged = int.from_bytes(self._flags, "little") | int.from_bytes(other._flags, "little")
            self._flags[:] = merged.to_bytes(len(self._flags), "little")
            self.count = len(self._flags) - self._flags.count(0)
            return
        for offset, n, dirty in other.runs():
            if dirty:
                self.mark(offset, n)

    def to_bits(self, align: int = 1) -> bytes:
        """The flags as bits, chunk i at bit i % 8 of byte i // 8 (QEMU's
        serialization), padded with zero bits to a multiple of `align` bytes."""
        nbytes = -(-len(self._flags) // 8)
        nbytes = -(-nbytes // align) * align
        if not self.count:
            return bytes(nbytes)
        # flags[i::8] holds bit i of every output byte (as 0/1 bytes): shift
        # each into place and OR them, in big-int operations (C speed)
        flags = bytes(self._flags) + bytes(nbytes * 8 - len(self._flags))
        acc = 0
        for i in range(8):
            acc |= int.from_bytes(flags[i::8], "little") << i
        return acc.to_bytes(nbytes, "little")

    def from_bits(self, bits: bytes | bytearray | memoryview) -> None:
        """Load flags stored by to_bits() (the inverse steps)."""
        n = len(self._flags)
        nb = -(-n // 8)
        value = int.from_bytes(bytes(bits[:nb]).ljust(nb, b"\0"), "little")
        ones = int.from_bytes(b"\x01" * nb, "little")
        flags = bytearray(nb * 8)
        for i in range(8):
            flags[i::8] = ((value >> i) & ones).to_bytes(nb, "little")
        self._flags[:] = flags[:n]
        self.count = n - self._flags.count(0)

    def sha256(self) -> str:
        """QEMU's x-debug-block-dirty-bitmap-sha256: the hash of the bits in
        64-bit words (its hbitmap's last level)."""
        return hashlib.sha256(self.to_bits(align=8)).hexdigest()
