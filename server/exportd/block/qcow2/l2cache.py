"""L2 table cache: decoded tables (array('Q'), host byte order) keyed by host offset."""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable

_LITTLE = sys.byteorder == "little"


def decode_table(data: bytes) -> array:
    a = array("Q", bytes(data))
    if _LITTLE:
        a.byteswap()
    return a


def encode_table(entries: array) -> bytes:
    if _LITTLE:
        a = array("Q", entries)
        a.byteswap()
        return a.tobytes()
    return entries.tobytes()


class L2Table:
    __slots__ = ("offset", "entries", "dirty")

    def __init__(self, offset: int, entries: array, dirty: bool = False) -> None:
        self.offset = offset
        self.entries = entries
        self.dirty = dirty


class L2Cache:
    """LRU of L2 tables. Only clean tables are evicted here; the driver writes
    dirty ones back (in crash-safe order) when the cache grows past its size."""

    def __init__(self, max_tables: int) -> None:
        self.max_tables = max(2, max_tables)
        self.tables: OrderedDict[int, L2Table] = OrderedDict()
        self._loading: dict[int, asyncio.Future[L2Table]] = {}

    def lookup(self, offset: int) -> L2Table | None:
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
        return t

    async def load(self, offset: int, loader: Callable[[int], Awaitable[array]]) -> L2Table:
        """The table at `offset`, loading it once even with concurrent callers.

        When the caller doing the load is cancelled (an interrupted read),
        the others waiting for it load the table themselves: they were not
        interrupted, so they must not answer EINTR.
        """
        while True:
            t = self.lookup(offset)
            if t is not None:
                return t
            fut = self._loading.get(offset)
            if fut is None:
                break
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and task is not None and not task.cancelling():
                    continue  # the loader was cancelled, not us: try again
                raise
        fut = asyncio.get_running_loop().create_future()
        self._loading[offset] = fut
        try:
            entries = await loader(offset)
            t = self.tables.get(offset)  # inserted meanwhile by a writer?
            if t is None:
                t = L2Table(offset, entries)
                self.insert(t)
            fut.set_result(t)
            return t
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._loading[offset]

    def insert(self, t: L2Table) -> None:
        self.tables[t.offset] = t
        self.tables.move_to_end(t.offset)
        self.evict_clean()

    def evict_clean(self) -> None:
        while len(self.tables) > self.max_tables:
            victim = next((o for o, t in self.tables.items() if not t.dirty), None)
            if victim is None:
                return
            del self.tables[victim]

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)

    def dirty_tables(self) -> list[L2Table]:
        return [t for t in self.tables.values() if t.dirty]

    def over_limit(self) -> bool:
        return len(self.tables) > self.max_tables
