"""Creating host files for images (QEMU's raw_co_create in file-posix.c):
blockdev-create driver=file (FileNode.create_steps), `exportctl create -f raw`,
and the new file under a qcow2 image (exportd.block.qcow2.create).

Plain synchronous file I/O: call it from a worker thread when on the event
loop. Errors are BlockError with a message for the user.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.block.locking import ImageLock
from exportd.block.node import Perm
from exportd.errors import BlockError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_CHUNK = 1 << 20

Step = Callable[[Any], Awaitable[None]]


def open_new(path: str) -> int:
    """Open `path` for (re)creation, emptied, holding QEMU-compatible image locks
    (write + resize, resize not shared), so an image in use by exportd, QEMU or
    qemu-img is refused instead of being destroyed. Closing the fd drops the locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    try:
        ImageLock(fd, path).change(Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.RESIZE)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fill(fd: int, start: int, end: int, mode: str) -> None:
    """Preallocate [start, end) of the file: falloc reserves, full writes zeroes."""
    if end <= start:
        return
    if mode == "falloc":
        os.posix_fallocate(fd, start, end - start)
    elif mode == "full":
        zero = bytes(_CHUNK)
        pos = start
        while pos < end:
            n = min(_CHUNK, end - pos)
            os.pwrite(fd, zero[:n], pos)
            pos += n


def create_file(path: str, size: int, preallocation: str = "off") -> None:
    """Create (or overwrite) the file `path` of `size` bytes."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BlockError("Image size must be a non-negative integer")
    if preallocation not in PREALLOC_MODES:
        raise BlockError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if preallocation == "metadata":
        raise BlockError("Unsupported preallocation mode 'metadata' for raw images")
    fd = open_new(path)
    try:
        os.ftruncate(fd, size)
        fill(fd, 0, size, preallocation)
        os.fsync(fd)
    except OSError as e:
        raise BlockError(f"Could not create '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


def file_create_steps(options: dict[str, Any]) -> tuple[Step, Step]:
    """blockdev-create driver=file: (prepare, work) for the job."""
    filename, size = options["filename"], options["size"]
    prealloc = options.get("preallocation", "off")
    # nocow and extent-size-hint are hints; exportd does not act on them

    async def prepare(job: Any) -> None:
        if prealloc == "metadata":
            raise BlockError(f"Unsupported preallocation mode: {prealloc}")

    async def work(job: Any) -> None:
        # plain file I/O (open, lock, truncate, fill, fsync): off the loop
        await in_own_thread(create_file, filename, size, prealloc)

    return prepare, work
