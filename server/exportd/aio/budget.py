"""Time slices for work that one client can make long (issue 16).

One loop serves every export and every client, so a piece of work that
runs for long without waiting stalls all of them. Such work takes turns:

    turn = TimeSlice()
    for item in many_items:
        handle(item)
        await turn.pause_if_due()   # yields once the slice is used up

A coroutine that awaits only things that are already done never gives the
loop back; pause_if_due does, after SLICE_S of work since the last pause.
"""

from __future__ import annotations

import asyncio
import time

# Long enough that the loop round trip (~20 us) costs little, short enough
# that a FUSE request queued behind the work waits well under a millisecond.
SLICE_S = 0.0005


class TimeSlice:
    def __init__(self, slice_s: float = SLICE_S) -> None:
        self.slice_s = slice_s
        self._since = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._since >= self.slice_s

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self._since = time.monotonic()

    async def pause_if_due(self) -> None:
        if time.monotonic() - self._since >= self.slice_s:
            await asyncio.sleep(0)
            self._since = time.monotonic()
