"""Busy-polling between requests (fuse/busypoll.py): the poller alone on a
socketpair, then real sessions served while it spins."""

from __future__ import annotations

import asyncio
import socket

import pytest

from exportd.fuse import busypoll
from exportd.fuse.busypoll import BusyPoller, poller_for
from tests.support.fuse import child, pattern, serving
from tests.support.toyfs import MemoryFS


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def drain_into(sock: socket.socket, got: list[bytes], *, idle: bool = True):
    def drain() -> bool:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            pass
        return idle

    return drain


async def test_spin_serves_what_arrives_while_it_polls(pair):
    a, b = pair
    poller = BusyPoller(asyncio.get_running_loop(), max_window_s=0.05)
    poller.window_s = poller.max_window_s
    got: list[bytes] = []
    poller.register(a.fileno(), drain_into(a, got))
    poller.idle()  # scheduled, not run yet
    b.send(b"request")  # already there when the spin starts
    await asyncio.sleep(0.2)  # the spin runs, serves it and gives up after its window
    assert got == [b"request"]
    assert poller.caught == 1 and poller.spins == 1
    poller.unregister(a.fileno())


async def test_spin_stops_when_a_handler_needs_the_loop(pair):
    a, b = pair
    poller = BusyPoller(asyncio.get_running_loop(), max_window_s=10.0)
    poller.window_s = poller.max_window_s
    got: list[bytes] = []
    poller.register(a.fileno(), drain_into(a, got, idle=False))
    poller.idle()
    b.send(b"x")
    # With a 10 s window only the "in flight" answer can end the spin early.
    await asyncio.wait_for(asyncio.sleep(0.05), 5)
    assert got == [b"x"]


async def test_window_opens_for_back_to_back_requests_and_closes_when_idle():
    poller = BusyPoller(asyncio.get_running_loop(), max_window_s=50e-6)
    assert poller.window_s == 0.0
    poller.idle()  # nothing to spin with: it just notes the time
    poller.woken()  # a request came at once: polling would have caught it
    assert poller.window_s == 50e-6
    halvings = 0
    while poller.window_s:
        poller._idle_since = 1.0  # slept for ages
        poller.woken()
        halvings += 1
    assert halvings == 4  # 50 -> 25 -> 12.5 -> 6.25 -> below 4 us: off


async def test_off_when_the_window_is_zero(monkeypatch):
    monkeypatch.setenv("EXPORTD_FUSE_BUSY_POLL_US", "0")
    assert poller_for(asyncio.get_running_loop()) is None
    monkeypatch.setenv("EXPORTD_FUSE_BUSY_POLL_US", "junk")
    assert busypoll.window_from_env() == busypoll.DEFAULT_WINDOW_US / 1e6


class SuspendingFS(MemoryFS):
    """Every other read suspends once, so it is answered from a task."""

    def __init__(self, size: int) -> None:
        super().__init__(size, direct_io=True)
        self.reads = 0

    async def read(self, fh, offset, size):
        self.reads += 1
        if self.reads % 2:
            await asyncio.sleep(0)
        return await super().read(fh, offset, size)


IO_LOOP = """
import time
path, rounds = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
bad = 0
for i in range(rounds):
    off = (i * 4096 * 7) % (size - 4096)
    block = bytes([i & 0xFF]) * 4096
    os.pwrite(fd, block, off)
    if os.pread(fd, 4096, off) != block:
        bad += 1
os.close(fd)
out(bad)
"""


@pytest.mark.parametrize("fs_class", [MemoryFS, SuspendingFS], ids=["inline", "tasks"])
async def test_sessions_answer_everything_while_polling(target, workdir, monkeypatch, fs_class):
    # A huge window: the loop spins for as long as requests keep coming.
    monkeypatch.setenv("EXPORTD_FUSE_BUSY_POLL_US", "20000")
    size = 1 << 20
    second = workdir / "second.img"
    second.write_bytes(b"")
    fs1 = fs_class(size) if fs_class is SuspendingFS else MemoryFS(size, direct_io=True)
    fs2 = fs_class(size) if fs_class is SuspendingFS else MemoryFS(size, direct_io=True)
    fs1.data[:] = fs2.data[:] = pattern(size)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    async with serving(fs1, target), serving(fs2, str(second)):
        poller = poller_for(asyncio.get_running_loop())
        assert poller is not None and poller.max_window_s == 0.02
        tick_task = asyncio.create_task(ticker())
        try:
            bad = await asyncio.gather(
                child(IO_LOOP, target, 1500), child(IO_LOOP, str(second), 1500)
            )
        finally:
            tick_task.cancel()
        assert bad == [0, 0]
        # The spin caught requests, and the loop still ran its timers meanwhile.
        assert poller.caught > 0
        assert ticks > 0
