"""Which chunks of a node still need copying: one flag per `granularity`
bytes (a bytearray: 16 Ki flags per GiB at 64 KiB)."""

from __future__ import annotations


class DirtyMap:
    def __init__(self, length: int, granularity: int) -> None:
        self.granularity = granularity
        self.length = length
        self._flags = bytearray(-(-length // granularity))
        self.count = 0  # dirty chunks

    def mark(self, offset: int, length: int) -> int:
        """Mark the chunks that [offset, offset + length) touches; returns
        how many bytes became dirty that were not."""
        if length <= 0 or offset >= self.length:
            return 0
        g = self.granularity
        a, b = offset // g, min(-(-(offset + length) // g), len(self._flags))
        fresh = self._flags.count(0, a, b)
        if fresh:
            self._flags[a:b] = b"\x01" * (b - a)
            self.count += fresh
        return fresh * g

    def clear(self, offset: int, length: int) -> None:
        """Clear the chunks [offset, offset + length) covers (chunk-aligned)."""
        g = self.granularity
        a, b = offset // g, min(-(-(offset + length) // g), len(self._flags))
        dirty = (b - a) - self._flags.count(0, a, b)
        if dirty:
            self._flags[a:b] = bytes(b - a)
            self.count -= dirty

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

    def dirty_bytes(self) -> int:
        return self.count * self.granularity
