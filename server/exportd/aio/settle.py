"""Work a command starts that its reply should wait for: the kernel told to
drop a FUSE export's cached size after a resize or a move to another node.
The notification is written from a worker thread (the kernel may wait on a
request of ours while it handles it), so it finishes after the command's own
code; daemon.execute waits for it before replying, so a client that has the
reply sees the new size."""

from __future__ import annotations

import asyncio

from exportd.aio.perloop import PerLoop

_PENDING: PerLoop[set[asyncio.Task[object]]] = PerLoop(lambda loop: set())


def settle_later(task: asyncio.Task[object]) -> None:
    """The reply to the command running now waits for `task` (a while at most)."""
    pending = _PENDING.get(asyncio.get_running_loop())
    pending.add(task)
    task.add_done_callback(pending.discard)


async def settled(timeout: float = 5.0) -> None:
    """Until the tasks given to settle_later are done, or `timeout` passed."""
    pending = _PENDING.get(asyncio.get_running_loop())
    if pending:
        await asyncio.wait(list(pending), timeout=timeout)
