"""Work in threads: the two ways the loop hands a blocking call to a worker.

    result = await in_own_thread(fn, *args, timeout=10.0)   # may hang on a mount
    result = await in_io_thread(fn, *args)                  # data I/O on an open fd

Two policies, because the two kinds of calls fail differently:

- in_own_thread: calls that may hang forever on a dead or hung FUSE mount
  (stat, open, mount, umount of a path; creating an image file). Each call
  gets a thread of its own for as long as it runs, so a call stuck on a hung
  mount never delays a later one (a fixed pool would starve), and `timeout`
  abandons the thread, never the loop. A thread that finishes waits for the
  next call instead of exiting: starting a thread costs 150-450 us on the
  2-core VM, a hand-over to a waiting one 20-40 us (bench/README.md, Levers:
  export add+del cycle).
- in_io_thread: data I/O of block drivers (pread, pwrite, fsync, fallocate on
  descriptors already open), many requests in flight. A bounded pool of
  POOL_THREADS that never exit, with no concurrent.futures layer: a worker
  takes (loop, future, fn, args) from a SimpleQueue and completes the asyncio
  future with one call_soon_threadsafe. Measured on the 2-core VM (uvloop,
  4 KiB pwrite): 58 vs 80 us per request at depth 1, 13 vs 31 us at depth 16,
  against loop.run_in_executor().

A third rule, for work no client is waiting on (a block job's copy): inside
`background()` the drivers send even the I/O they would do inline on the
loop (tmpfs, page-cache hits) to the pool, so the loop is free for the
requests that are waited on.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("exportd_background", default=False)


def set_background() -> None:
    """From here on in this task (and the coroutines it awaits), I/O is background work."""
    _BACKGROUND.set(True)


def in_background() -> bool:
    return _BACKGROUND.get()


KEEP_IDLE = 2  # own threads kept waiting for work; more exit when done
POOL_THREADS = 16  # many requests in flight; the threads mostly sleep in the kernel


def _deliver(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller gave up (timeout, cancellation)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _call(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
          fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In a worker: run one job and hand its outcome to the loop."""
    try:
        result, error = fn(*args), None
    except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
        result, error = None, e
    try:
        loop.call_soon_threadsafe(_deliver, fut, result, error)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more


class _OwnThreads:
    """A thread per running call; up to KEEP_IDLE finished ones wait for more."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting on the queue and not yet promised a job

    def submit(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
               fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        with self._lock:
            # Promise the job to an idle thread, or start one: every queued job
            # has a thread of its own, whatever the others are stuck on.
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put((loop, fut, fn, args))
        if spawn:
            threading.Thread(target=self._work, name="exportd-path", daemon=True).start()

    def _work(self) -> None:
        while True:
            loop, fut, fn, args = self._jobs.get()
            _call(loop, fut, fn, args)
            del loop, fut, fn, args
            with self._lock:
                if self._idle >= KEEP_IDLE:
                    return
                self._idle += 1


class _IOPool:
    """POOL_THREADS workers started on demand, kept for good."""

    def __init__(self, threads: int = POOL_THREADS) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = threads
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        if self._idle == 0 and self._started < self._threads:
            self._spawn()
        return fut

    def _spawn(self) -> None:
        with self._lock:
            if self._started >= self._threads:
                return
            self._started += 1
        threading.Thread(target=self._work, name=f"exportd-io-{self._started}", daemon=True).start()

    def _work(self) -> None:
        get = self._queue.get
        lock = self._lock
        while True:
            with lock:
                self._idle += 1
            loop, fut, fn, args = get()
            with lock:
                self._idle -= 1
            _call(loop, fut, fn, args)
            del loop, fut, fn, args


_own_threads = _OwnThreads()
_io_pool = _IOPool()


async def in_own_thread(
    fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
) -> T:
    """fn(*args, **kwargs) in a thread of its own, for calls that may hang on
    a mount. With `timeout`, give up waiting after it (OSError ETIMEDOUT);
    the thread is abandoned, never the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    _own_threads.submit(loop, fut, fn, args)
    if timeout is None:
        return await fut
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None


def in_io_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """fn(*args) in the bounded I/O pool, for data I/O on open descriptors.
    Returns the future at once (the call is already queued): await it, or
    shield it and attach callbacks."""
    return _io_pool.submit(fn, args)
