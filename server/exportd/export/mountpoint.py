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

import errno
import os
import stat

from exportd.aio.threads import in_own_thread
from exportd.errors import QMPError

PATH_TIMEOUT_S = 10.0  # a stat that takes longer is on a hung mount


def canonical_path(path: str) -> str:
    """realpath() of the parent plus the last component: the same file
    however it is spelt. A symlink as last component is resolved too, since
    mount(2) follows it and mounts on its target. Blocking: call it through
    in_own_thread(), the lstat may reach one of our own mounts."""
    absolute = os.path.abspath(path)
    parent, last = os.path.split(absolute)
    canonical = os.path.join(os.path.realpath(parent), last)
    if os.path.islink(canonical):
        canonical = os.path.realpath(canonical)
    return canonical


# what stat says on a FUSE mount whose server is gone
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def probe_path(path: str) -> tuple[str, os.stat_result | OSError]:
    """Blocking (run through in_own_thread): the canonical path, and what stat()
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
        st: os.stat_result | OSError = await in_own_thread(lambda: os.stat(path), timeout=PATH_TIMEOUT_S)
    except OSError as e:
        st = e
    check_regular_file_stat(path, st)
