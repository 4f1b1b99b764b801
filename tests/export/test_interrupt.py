"""A request interrupted by a signal before its handler task first runs must
still be answered, and must not leave a reference on the export behind.

Regression: FuseSession._run starts a handler eagerly and, when it
suspends, wraps it in a task; an INTERRUPT read in the same burst used to
cancel that task before its first step, so the handler never ran again: no
reply (the client hung in the kernel) and the export kept the request's
reference. qemu-img and fio get signals during I/O, so this showed up as rare
hangs under load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from .test_lifecycle import Host, add


async def test_interrupt_before_handler_task_runs(workdir: Path) -> None:
    host = Host()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        await host.graph.add(
            {"driver": "null-co", "node-name": "null0", "size": 1 << 20, "latency-ns": 200_000_000}
        )
        exp = await add(host, workdir, "e")
        mnt = workdir / "e.raw"
        go = threading.Event()
        result: dict[str, object] = {}

        def reader() -> None:
            fd = os.open(mnt, os.O_RDONLY)
            try:
                go.wait()
                result["data"] = len(os.pread(fd, 4096, 0))
            except OSError as e:
                result["errno"] = e.errno
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        await asyncio.sleep(0.2)  # the OPEN is served
        go.set()
        # Keep this loop from reading /dev/fuse while the READ is queued and
        # the signal marks it interrupted: the READ and its INTERRUPT then
        # arrive in one burst. (This test's own loop serves the mount, and
        # the reader is another thread: nothing here waits on the mount.)
        time.sleep(0.2)
        signal.pthread_kill(thread.ident or 0, signal.SIGUSR1)
        time.sleep(0.1)
        for _ in range(20):
            if not thread.is_alive():
                break
            await asyncio.sleep(0.1)
        answered = not thread.is_alive()
        leaked = exp.refcount
        interrupts = exp.session.count("INTERRUPT")
        reads = exp.session.count("READ")
        if not answered:
            host.exports.delete("e", "hard")  # frees the reader (ENOTCONN)
            await asyncio.wait_for(exp.wait_deleted(), 10)
            thread.join(10)
        assert interrupts == 1, "the signal did not interrupt a READ in flight"
        assert answered, "the interrupted READ was never answered"
        # Python retries a read that failed with EINTR (PEP 475): a second
        # READ and the data show that the first one was answered EINTR
        assert reads == 2 and result.get("data") == 4096, (reads, result)
        assert leaked == 1, "the interrupted request kept its reference on the export"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        await asyncio.wait_for(host.exports.shutdown_all(), 20)
        await host.graph.close_all()
