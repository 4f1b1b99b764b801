"""The L2 table cache: one load per table, and interrupted loads."""

from __future__ import annotations

import asyncio
from array import array

import pytest

from exportd.block.qcow2.l2cache import L2Cache

OFFSET = 65536


def loader_that_hangs_first(calls: list[int], started: asyncio.Event):
    async def load(offset: int) -> array:
        calls.append(offset)
        if len(calls) == 1:
            started.set()
            await asyncio.get_running_loop().create_future()  # interrupted, never done
        return array("Q", [7] * 8)

    return load


async def test_concurrent_callers_share_one_load():
    cache = L2Cache(4)
    calls: list[int] = []
    gate = asyncio.Event()

    async def load(offset: int) -> array:
        calls.append(offset)
        await gate.wait()
        return array("Q", [1] * 8)

    tasks = [asyncio.create_task(cache.load(OFFSET, load)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    tables = await asyncio.gather(*tasks)
    assert calls == [OFFSET] and tables[0] is tables[1] is tables[2]


async def test_waiters_load_again_when_the_loading_request_is_interrupted():
    cache = L2Cache(4)
    calls: list[int] = []
    started = asyncio.Event()
    load = loader_that_hangs_first(calls, started)
    first = asyncio.create_task(cache.load(OFFSET, load))
    await started.wait()
    second = asyncio.create_task(cache.load(OFFSET, load))
    await asyncio.sleep(0)  # second now waits for first's load
    first.cancel()
    table = await asyncio.wait_for(second, 5)  # not CancelledError: it was not interrupted
    assert list(table.entries) == [7] * 8 and calls == [OFFSET, OFFSET]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert cache.lookup(OFFSET) is table


async def test_an_interrupted_waiter_is_still_interrupted():
    cache = L2Cache(4)
    gate = asyncio.Event()

    async def load(offset: int) -> array:
        await gate.wait()
        return array("Q", [3] * 8)

    first = asyncio.create_task(cache.load(OFFSET, load))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.load(OFFSET, load))
    await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    gate.set()
    assert list((await first).entries) == [3] * 8
