"""Adaptive busy-polling of a loop's FUSE fds between requests.

A client doing I/O back to back (fio at queue depth 1, dd, cp) sends its next
request a few microseconds after our reply. If the loop goes back to epoll,
that request has to wake a sleeping CPU, which on a virtual machine costs more
than serving the request (measured here: 50 us per 4 KiB read without, 20 us
with a 50 us window; bench/README.md, Levers). So when the last request in
flight has been answered, the loop spins on the fds of every session it
serves for a short window before sleeping.

The window adapts as QEMU's AioContext polling does: it opens fully when a
request arrived soon after we stopped polling (spinning longer would have
caught it) and halves after each longer sleep, so an idle or slow client
costs no CPU. The loop keeps turning while we spin: after SLICE_S of
serving we hand control back through call_soon, whose pending callback also
keeps the loop from blocking in epoll.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import Callable

from exportd.aio.perloop import PerLoop

DEFAULT_WINDOW_US = 50.0
# Windows shorter than this are not worth a syscall loop: polling stops.
MIN_WINDOW_S = 4e-6
# Longest run of spinning and serving before the loop gets a turn.
SLICE_S = 1e-3


def window_from_env() -> float:
    """The maximal window in seconds: EXPORTD_FUSE_BUSY_POLL_US, 0 = off."""
    text = os.environ.get("EXPORTD_FUSE_BUSY_POLL_US", "")
    try:
        us = float(text) if text else DEFAULT_WINDOW_US
    except ValueError:
        us = DEFAULT_WINDOW_US
    return max(0.0, us) / 1e6


class BusyPoller:
    """Spins on the registered fds of one loop; see the module docstring.

    `drain` callbacks read and dispatch what their fd has and return True
    when their session has nothing in flight (a handler still running needs
    the loop, so the spin stops).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_window_s: float) -> None:
        self.max_window_s = max_window_s
        self.window_s = 0.0
        self._loop = loop
        self._poll = select.poll()
        self._drains: dict[int, Callable[[], bool]] = {}
        # fds whose readiness also shows in our memory (an io_uring's CQ),
        # looked at between two poll(0) calls: a completion the kernel posted
        # on the way out of the last poll is served without another one
        self._peeks: dict[int, Callable[[], bool]] = {}
        self._idle_since = 0.0
        self._spinning = False
        self._scheduled = False
        self.spins = 0  # statistics for tests and benchmarks
        self.caught = 0

    def register(
        self, fd: int, drain: Callable[[], bool], peek: Callable[[], bool] | None = None
    ) -> None:
        self._drains[fd] = drain
        self._poll.register(fd, select.POLLIN)
        if peek is not None:
            self._peeks[fd] = peek

    def unregister(self, fd: int) -> None:
        self._peeks.pop(fd, None)
        if self._drains.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def _forget(self, fd: int) -> None:
        try:
            self._poll.unregister(fd)
        except KeyError:
            pass

    def woken(self) -> None:
        """An fd woke the loop from epoll: adapt the window to the sleep."""
        since = self._idle_since
        if not since or self._spinning:
            return
        self._idle_since = 0.0
        slept = time.perf_counter() - since
        if slept < self.max_window_s:
            self.window_s = self.max_window_s
        elif self.window_s:
            half = self.window_s / 2
            self.window_s = half if half >= MIN_WINDOW_S else 0.0

    def idle(self) -> None:
        """A session has nothing left to read and nothing in flight."""
        if self._spinning or self._scheduled:
            return
        if not self.window_s:
            self._idle_since = time.perf_counter()
            return
        self._scheduled = True
        self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        self._scheduled = False
        self._spinning = True
        self.spins += 1
        now = time.perf_counter()
        deadline = now + self.window_s
        slice_end = now + SLICE_S
        poll = self._poll.poll
        drains = self._drains
        peeks = self._peeks
        try:
            while True:
                ready = poll(0)
                if not ready and peeks:
                    ready = [(fd, 0) for fd, peek in peeks.items() if peek()]
                now = time.perf_counter()
                if ready:
                    self.caught += 1
                    for fd, _ in ready:
                        drain = drains.get(fd)
                        if drain is None:
                            self._forget(fd)
                        elif not drain():
                            return  # a handler runs as a task: it needs the loop
                    if now >= slice_end:
                        self._scheduled = True
                        self._loop.call_soon(self._spin)
                        return
                    deadline = now + self.window_s
                elif now >= deadline:
                    break
        finally:
            self._spinning = False
        self._idle_since = time.perf_counter()


_pollers: PerLoop[BusyPoller] = PerLoop(lambda loop: BusyPoller(loop, window_from_env()))


def serve_readable(poller: BusyPoller | None, drain: Callable[[], bool]) -> None:
    """An fd's readable callback: drain it, telling the poller (if any) that
    the loop was woken and, when nothing is left in flight, that it may spin."""
    if poller is None:
        drain()
        return
    poller.woken()
    if drain():
        poller.idle()


def poller_for(loop: asyncio.AbstractEventLoop) -> BusyPoller | None:
    """The poller shared by every session on `loop`; None when polling is off."""
    if not window_from_env():
        return None
    return _pollers.get(loop)
