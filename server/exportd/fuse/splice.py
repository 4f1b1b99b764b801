"""READ replies spliced from the image file: one copy instead of two.

A READ answered from a buffer costs two copies of the data: the file's pages
into our buffer (pread), our buffer into the reader's pages (writev to
/dev/fuse). With splice(2) the pipe only references the file's page-cache
pages and the kernel copies them once, into the reader's pages:

    write(pipe, fuse_out_header)
    splice(image fd -> pipe)        per piece: references, no copy
    splice(pipe -> /dev/fuse)       the one copy

Only for files whose pages cannot make us wait (tmpfs: extents that say
never_blocks), since the loop thread does it; readreply.py decides. A pipe holds at most
pipe-max-size bytes (1 MiB here, and raising it takes CAP_SYS_RESOURCE), the
header included, so sessions that splice mount with max_read = SPLICE_MAX_READ:
a 1 MiB read arrives as 1020 KiB + 4 KiB (measured: still 15-20% faster than
one 1 MiB request answered with two copies; bench/README.md, Levers).
"""

from __future__ import annotations

import asyncio
import fcntl
import os

from exportd.aio.perloop import PerLoop
from exportd.extents import Extent

PIPE_SIZE = 1 << 20
HEADER_PAGE = 4096  # the out header takes a pipe slot (a page) of its own
SPLICE_MAX_READ = PIPE_SIZE - HEADER_PAGE
# Below this, the extra syscalls cost more than the copy saved.
SPLICE_MIN = 64 * 1024


class ReplyPipe:
    """A pipe big enough for one spliced reply; emptied after every use."""

    def __init__(self) -> None:
        self._r = self._w = -1
        self.usable = True
        self._open()

    def _open(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            os.close(r)
            os.close(w)
            self.usable = False  # pipe-max-size below 1 MiB: splicing is off
            return
        self._r, self._w = r, w

    def _reset(self) -> None:
        """Drop whatever a failed reply left in the pipe."""
        self.close()
        self._open()

    def __del__(self) -> None:
        self.close()  # the loop that owned this pipe is gone

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def fill(self, header: bytes, extents: list[Extent]) -> bool:
        """Put header + the extents' bytes (host file ranges: fd >= 0) in
        the pipe; False (pipe emptied) when a file gave less than its
        extent's length or failed: answer another way."""
        try:
            os.write(self._w, header)
            for fd, offset, length, _ in extents:
                while length:
                    n = os.splice(fd, self._w, length, offset_src=offset)
                    if n <= 0:
                        raise EOFError
                    offset += n
                    length -= n
        except (OSError, EOFError):
            self._reset()
            return False
        return True

    def send(self, dev_fd: int, length: int) -> None:
        """Move the whole message to /dev/fuse. Raises OSError as a writev
        of the reply would (ENOENT: the request was interrupted)."""
        try:
            n = os.splice(self._r, dev_fd, length)
        except OSError:
            self._reset()
            raise
        if n != length:  # the kernel takes a reply whole or not at all
            self._reset()
            raise OSError(5, f"short splice to /dev/fuse ({n} of {length} bytes)")


_pipes: PerLoop[ReplyPipe] = PerLoop(lambda _loop: ReplyPipe())


def pipe_for(loop: asyncio.AbstractEventLoop) -> ReplyPipe:
    """The reply pipe shared by every session on `loop` (one reply at a time)."""
    return _pipes.get(loop)
