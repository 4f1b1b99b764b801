"""Blocking work off the test's event loop, so the FUSE sessions and QMP
events it serves keep flowing while a test waits on a mount."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def athread(fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
    """A Python syscall on a mount, in a worker thread with a time limit."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)
