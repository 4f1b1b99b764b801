"""Resumable requests: start a coroutine inline, continue it only if it waits.

    result = start_eagerly(handler(...))
    if type(result) is Resume:             # it waits: go on in a task
        task = loop.create_task(finish(result))    # finish() awaits it
    else:
        ...                                # done inline, no task at all

Most requests finish without waiting (page-cache hits, tmpfs, in-memory
data); running them inline where the request is read saves the task and the
loop round trip. Only one that really waits becomes a task, which resumes it
exactly where it stopped. Used by the FUSE channel for every request and by
the export's write path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class Resume:
    """Awaitable that keeps driving a coroutine that already suspended once.

    This is what lets a request start eagerly in the read callback and move
    to a task only when it really waits: the task resumes exactly where the
    coroutine stopped (cancellation and exceptions are thrown into it).
    """

    __slots__ = ("_coro", "_pending", "cancel_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending
        # Set when the request is interrupted before its task first ran: a
        # task cancelled before its first step never runs its coroutine at
        # all, so the cancellation is delivered here instead.
        self.cancel_first = False

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value = self._pending
        self._pending = None
        if self.cancel_first:
            try:
                value = coro.throw(asyncio.CancelledError())
            except StopIteration as stop:
                return stop.value
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: B036 - forwarded into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def start_eagerly(coro: Coroutine[Any, Any, T]) -> T | Resume:
    """Run `coro` up to its first wait. Returns its result when it finished
    without waiting, else a Resume that continues it (await it, in a task).
    Its exception, if it fails before waiting, propagates. No object is made
    for a coroutine that finishes inline (the hot path allocates nothing)."""
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return Resume(coro, pending)
