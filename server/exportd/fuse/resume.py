"""Continuing a coroutine that already ran up to its first wait.

Requests start eagerly (a coroutine is driven with send(None) right where
the request is read) and become tasks only when they really wait; Resume is
the awaitable such a task runs, resuming exactly where the coroutine
stopped. Used by the FUSE session and by the export's write path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


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
