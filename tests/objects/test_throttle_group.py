"""A throttle group's scheduling on a real asyncio loop (the group object
and its members, without a daemon): QEMU's leaky buckets let the first
tenth of a second through at once, then the average; bursts (-max,
-max-length) as util/throttle.c computes them; iops-size; members served
in turn; cancelled and leaving requests do not stall the others; new
limits apply to waiting requests; the loop never blocks meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from exportd.block.throttle import ThrottleGroup, ThrottleMember
from exportd.errors import QMPError

SLACK = 1.4  # upper bounds allow for a loaded machine; lower bounds are the limits
STALL_S = 20  # a request still waiting after this is stuck


def group(**limits: Any) -> ThrottleGroup:
    g = ThrottleGroup.from_args({"id": "tg", "limits": limits})
    g.load()
    return g


async def elapsed(*requests: Any) -> float:
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*requests), STALL_S)
    return time.monotonic() - t0


async def test_average_after_a_tenth_of_a_second() -> None:
    m = group(**{"iops-total": 200}).register()
    # 21 go at once (the bucket holds 200 / 10), the other 99 at 200 per second
    t = await elapsed(*(m.intercept(512, False) for _ in range(120)))
    assert 99 / 200 * 0.95 <= t <= 99 / 200 * SLACK


async def test_bytes_per_second() -> None:
    m = group(**{"bps-write": 1 << 20}).register()
    t = await elapsed(*(m.intercept(64 << 10, True) for _ in range(40)))
    # 2 requests fill the 104857-byte bucket; 38 * 64 KiB more at 1 MiB/s
    assert 38 / 16 * 0.95 <= t <= 38 / 16 * SLACK
    # reads are not limited by bps-write
    assert await elapsed(*(m.intercept(64 << 10, False) for _ in range(40))) < 0.2


async def test_burst_of_max_for_max_length_seconds() -> None:
    # max 400 for 1 s: 401 at once, then 100 per second
    m = group(**{"iops-total": 100, "iops-total-max": 400}).register()
    assert await elapsed(*(m.intercept(512, False) for _ in range(401))) < 0.2
    t = await elapsed(*(m.intercept(512, False) for _ in range(30)))
    assert 0.28 <= t <= 0.3 * SLACK
    # max 200 for 2 s: the burst itself is held to 200 per second
    m = group(**{"iops-total": 50, "iops-total-max": 200, "iops-total-max-length": 2}).register()
    t = await elapsed(*(m.intercept(512, False) for _ in range(221)))
    assert 200 / 200 * 0.95 <= t <= 200 / 200 * SLACK


async def test_iops_size_counts_large_requests_as_several() -> None:
    m = group(**{"iops-total": 100, "iops-size": 4096}).register()
    # 10 units each: the second request already finds the bucket (10) full
    t = await elapsed(*(m.intercept(40960, False) for _ in range(6)))
    assert 4 * 10 / 100 * 0.95 <= t <= 0.4 * SLACK


async def test_reads_and_writes_share_the_total() -> None:
    m = group(**{"iops-total": 100}).register()
    reqs = [m.intercept(512, is_write) for is_write in (False, True) for _ in range(50)]
    t = await elapsed(*reqs)
    assert (100 - 12) / 100 * 0.9 <= t <= SLACK


async def test_members_are_served_in_turn() -> None:
    g = group(**{"iops-total": 100})
    a, b = g.register(), g.register()
    done: list[str] = []

    async def req(m: ThrottleMember, name: str) -> None:
        await m.intercept(512, False)
        done.append(name)

    await elapsed(*(req(a, "a") for _ in range(40)), *(req(b, "b") for _ in range(40)))
    throttled = done[12:52]  # after the burst
    assert 15 <= throttled.count("a") <= 25, done


async def test_loop_keeps_running_while_requests_wait() -> None:
    m = group(**{"iops-total": 50}).register()
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - t - 0.005)

    tick = asyncio.ensure_future(ticker())
    try:
        await elapsed(*(m.intercept(512, False) for _ in range(30)))
    finally:
        tick.cancel()
    assert len(lags) > 50 and max(lags) < 0.1


async def test_cancelled_and_leaving_requests_do_not_stall_the_rest() -> None:
    g = group(**{"iops-total": 10})
    m = g.register()
    first = [asyncio.ensure_future(m.intercept(512, False)) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert sum(f.done() for f in first) == 2  # the bucket holds one: two go
    first[2].cancel()
    t = await elapsed(first[3])
    assert 0.05 <= t <= 0.2 * SLACK  # only one wait in front of it, not two
    # a member leaving its group lets its waiting requests go
    waiting = [asyncio.ensure_future(m.intercept(512, False)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert not all(f.done() for f in waiting)
    g.unregister(m)
    await asyncio.wait_for(asyncio.gather(*waiting), 0.5)
    assert not g.in_use()


async def test_new_limits_apply_to_waiting_requests() -> None:
    g = group(**{"iops-total": 1})
    m = g.register()
    reqs = [asyncio.ensure_future(m.intercept(512, False)) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert sum(f.done() for f in reqs) == 1
    with pytest.raises(QMPError, match="bps/iops/max total values and read/write values"):
        g.set_limits({"iops-read": 5})
    g.set_limits({"iops-total": 1000})
    await asyncio.wait_for(asyncio.gather(*reqs), 0.5)
    assert g.get_limits()["iops-total"] == 1000
