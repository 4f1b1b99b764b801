"""Mountpoint checks for FUSE exports, safe against our own mounts.

QEMU stat()s the mountpoint on its main loop; when an export of the same
process already sits there under a different spelling (`mnt.raw` vs
`/abs/mnt.raw`), that stat waits for a reply the blocked loop can never send.
exportd never touches a mountpoint path from the loop thread: every path
syscall runs in a worker thread with a timeout, and "ours" is decided by
canonical path (realpath of the parent + last component) and by the mount
table (/proc/self/mountinfo, a procfs read that never reaches a FUSE server).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from exportd.errors import QMPError

T = TypeVar("T")

PATH_TIMEOUT_S = 10.0  # a stat that takes longer is on a hung mount


async def in_thread(fn: Callable[[], T], timeout: float = PATH_TIMEOUT_S) -> T:
    """Run a blocking path syscall in its own daemon thread, waiting at most
    `timeout`. A thread stuck on a dead mount is abandoned (it cannot be
    interrupted), never the loop; a fresh thread per call keeps a stuck one
    from starving later calls the way a shared pool would."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, ok = e, False
        try:
            loop.call_soon_threadsafe(deliver, ok, result)
        except RuntimeError:
            pass  # loop closed meanwhile

    threading.Thread(target=run, name="exportd-path", daemon=True).start()
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None


def canonical_path(path: str) -> str:
    """realpath() of the parent plus the last component: the same file
    however it is spelt. A symlink as last component is resolved too, since
    mount(2) follows it and mounts on its target. Blocking: call it through
    in_thread(), the lstat may reach one of our own mounts."""
    absolute = os.path.abspath(path)
    parent, last = os.path.split(absolute)
    canonical = os.path.join(os.path.realpath(parent), last)
    if os.path.islink(canonical):
        canonical = os.path.realpath(canonical)
    return canonical


# what stat says on a FUSE mount whose server is gone
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def probe_path(path: str) -> tuple[str, os.stat_result | OSError]:
    """Blocking (run through in_thread): the canonical path, and what stat()
    says about the path (its result or its error)."""
    canonical = canonical_path(path)
    try:
        return canonical, os.stat(path)
    except OSError as e:
        return canonical, e


def check_regular_file_stat(path: str, st: os.stat_result | OSError) -> None:
    """QEMU's is_regular_file() on a stat result, with its error texts."""
    if isinstance(st, OSError):
        code = st.errno or errno.EIO
        raise QMPError(f"Failed to stat '{path}': {os.strerror(code)}")
    if not stat.S_ISREG(st.st_mode):
        raise QMPError(f"'{path}' is not a regular file")


async def check_regular_file(path: str) -> None:
    """QEMU's is_regular_file(), with its error texts, off the loop thread."""
    try:
        st: os.stat_result | OSError = await in_thread(lambda: os.stat(path))
    except OSError as e:
        st = e
    check_regular_file_stat(path, st)
