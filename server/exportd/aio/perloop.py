"""One shared object per event loop (buffer pools, the poller, the reply pipe).

Keyed weakly by the loop, so a closed and dropped loop takes its objects
along; loop types without weak references are keyed by id instead.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._make = make
        self._weak: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._strong: dict[int, T] = {}

    def get(self, loop: asyncio.AbstractEventLoop) -> T:
        try:
            found = self._weak.get(loop)
            if found is None:
                found = self._weak[loop] = self._make(loop)
        except TypeError:  # a loop type without weak references
            found = self._strong.get(id(loop))
            if found is None:
                found = self._strong[id(loop)] = self._make(loop)
        return found
