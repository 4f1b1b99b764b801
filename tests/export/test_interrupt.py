"""Requests interrupted by a signal (FUSE INTERRUPT) while the daemon serves them.

- A READ interrupted before its handler task first runs must still be
  answered (EINTR) and must not leave a reference on the export behind.
  Regression: FuseSession._run starts a handler eagerly and, when it
  suspends, wraps it in a task; an INTERRUPT read in the same burst used to
  cancel that task before its first step, so the handler never ran again: no
  reply (the client hung in the kernel) and the export kept the request's
  reference. qemu-img and fio get signals during I/O, so this showed up as
  rare hangs under load.
- A WRITE is never cancelled: its I/O may already be under way in a worker
  thread, so answering EINTR would let it land after a newer write of the
  same range. It finishes and answers normally.

Python retries a call that failed with EINTR (PEP 475), so an answer of
EINTR shows up as a second request of the same kind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from tests.support.host import Host, add


async def interrupt_one(workdir: Path, op: str) -> tuple[dict[str, object], dict[str, int], int]:
    """One `op` ("read" or "write") of 4 KiB on a slow null-co export, hit by a
    signal while it waits. Returns (the reader's result, counters, refcount)."""
    host = Host()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        await host.graph.add(
            {"driver": "null-co", "node-name": "null0", "size": 1 << 20, "latency-ns": 200_000_000}
        )
        exp = await add(host, workdir, "e", writable=op == "write")
        mnt = workdir / "e.raw"
        go = threading.Event()
        result: dict[str, object] = {}

        def client() -> None:
            fd = os.open(mnt, os.O_RDWR if op == "write" else os.O_RDONLY)
            try:
                go.wait()
                if op == "write":
                    result["data"] = os.pwrite(fd, b"x" * 4096, 0)
                else:
                    result["data"] = len(os.pread(fd, 4096, 0))
            except OSError as e:
                result["errno"] = e.errno
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        await asyncio.sleep(0.2)  # the OPEN is served
        go.set()
        # Keep this loop from reading /dev/fuse while the request is queued
        # and the signal marks it interrupted: the request and its INTERRUPT
        # then arrive in one burst. (This test's own loop serves the mount,
        # and the client is another thread: nothing here waits on the mount.)
        time.sleep(0.2)
        signal.pthread_kill(thread.ident or 0, signal.SIGUSR1)
        time.sleep(0.1)
        for _ in range(20):
            if not thread.is_alive():
                break
            await asyncio.sleep(0.1)
        answered = not thread.is_alive()
        refcount = exp.refcount
        counts = {name: exp.session.count(name) for name in ("INTERRUPT", "READ", "WRITE")}
        if not answered:
            host.exports.delete("e", "hard")  # frees the client (ENOTCONN)
            await asyncio.wait_for(exp.wait_deleted(), 10)
            thread.join(10)
        assert answered, f"the interrupted {op} was never answered"
        return result, counts, refcount
    finally:
        signal.signal(signal.SIGUSR1, previous)
        await asyncio.wait_for(host.exports.shutdown_all(), 20)
        await host.graph.close_all()


async def test_interrupt_before_read_task_runs(workdir: Path) -> None:
    result, counts, refcount = await interrupt_one(workdir, "read")
    assert counts["INTERRUPT"] == 1, "the signal did not interrupt a READ in flight"
    assert counts["READ"] == 2 and result.get("data") == 4096, (counts, result)  # EINTR, retried
    assert refcount == 1, "the interrupted request kept its reference on the export"


async def test_interrupted_write_completes(workdir: Path) -> None:
    result, counts, refcount = await interrupt_one(workdir, "write")
    assert counts["INTERRUPT"] == 1, "the signal did not interrupt a WRITE in flight"
    assert counts["WRITE"] == 1 and result.get("data") == 4096, (counts, result)  # not retried
    assert refcount == 1
