"""Worker threads for calls that may hang on a dead mount (stat, mount, umount).

    result = await blocking_call(fn, *args, timeout=10.0)

Each call gets a thread of its own for as long as it runs, so a call stuck
on a hung FUSE mount never delays a later one (a fixed pool would starve).
Unlike a fresh thread per call, a thread that finishes waits for the next
call: starting a thread costs 150-450 us on the 2-core VM, a hand-over to a
waiting one 20-40 us (bench/README.md, Levers: export add+del cycle).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

KEEP_IDLE = 2  # threads kept waiting for work; more exit when done


class _Threads:
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
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_deliver, fut, result, error)
            except RuntimeError:
                pass  # loop closed meanwhile
            del loop, fut, fn, args, result, error
            with self._lock:
                if self._idle >= KEEP_IDLE:
                    return
                self._idle += 1


def _deliver(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller gave up (timeout, cancellation)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


_threads = _Threads()


async def blocking_call(
    fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
) -> T:
    """fn(*args, **kwargs) in a worker thread. With `timeout`, give up waiting after it
    (OSError ETIMEDOUT); the thread is abandoned, never the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    _threads.submit(loop, fut, fn, args)
    if timeout is None:
        return await fut
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None
