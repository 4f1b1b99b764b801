"""A thread per FUSE ring queue: READ and WRITE answered off the loop.

The kernel queues a request on the queue of the CPU its caller runs on
(uring.py). In this design each queue has its own io_uring and its own
thread, pinned to that CPU, which waits in io_uring_enter (the GIL
released) for the kernel to fill one of the queue's entries. The thread
answers READ and WRITE itself when the file system lets it (a RingIO,
filesystem.py: for an export, the bytes of a host file, export/hostio.py),
straight between the entry's payload buffer and the file, and commits the
reply with the next wait: one system call per request, on the caller's own
CPU. Everything else (and any READ or WRITE the RingIO declines) is handed
to the loop with call_soon_threadsafe; the loop answers it through
FuseRing.commit, which prepares the entry and passes it back here through a
queue and an eventfd whose read is always pending in the ring.

Why the commits go through this thread: a COMMIT_AND_FETCH also fetches the
entry's next request, and the kernel delivers that request as task work of
the task that submitted the command. Commits submitted by the loop would
bind the queue's requests to the loop's thread.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from . import abi
from .filesystem import RingIO, without_setid
from .iouring import SETUP_COOP_TASKRUN, IoUring
from .requests import READ_HEAD, WRITE_HEAD
from .uring import IN_HEAD, OP_IN, PAGE, PAYLOAD_SZ, PAYLOAD_SZ_AT, queue_commit, register_entries

if TYPE_CHECKING:
    from .uring import Entry, FuseRing

log = logging.getLogger(__name__)

WAKE = 1 << 32  # user_data of the eventfd read (entries use their index)
OUT = abi.OUT_HEADER
WRITE_OUT = abi.WRITE_OUT
_WRITE_KILL_SUIDGID = abi.WRITE_KILL_SUIDGID
_PR_SET_NAME = 15
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class QueueThread:
    """The thread, io_uring and entries of one kernel queue."""

    def __init__(self, ring: FuseRing, qid: int, entries: list[Entry], pin: bool) -> None:
        self.ring = ring
        self.qid = qid
        self.entries = entries
        self.pin = pin
        self.io = IoUring(len(entries) + 2, flags=SETUP_COOP_TASKRUN)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_word = ctypes.c_uint64(0)  # where the eventfd read lands
        self.replies: collections.deque[tuple[Entry, int]] = collections.deque()
        self.stopping = False
        self.live = 0  # entries the kernel holds
        self.handed = 0  # requests handed to the loop
        self.reads = 0  # answered here
        self.writes = 0
        self.lost = 0
        self.error: OSError | None = None  # why registration failed
        self._registered = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fuse-ring-{qid}", daemon=True)

    # --- the loop's side ----------------------------------------------------------

    def start(self) -> None:
        """Start the thread and wait for the kernel to take (or refuse) the
        entries; raises the refusal."""
        self.thread.start()
        self._registered.wait()
        if self.error is not None:
            raise self.error

    def hand_back(self, e: Entry, unique: int) -> None:
        """Commit `e` (its reply is in its buffer): from the loop."""
        self.replies.append((e, unique))
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass  # stopped: nobody to answer

    def signal_stop(self) -> None:
        """Ask the thread to end once its current request is answered."""
        self.stopping = True
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def stop(self, timeout: float) -> bool:
        """Wait for the thread (signal_stop first), then close its ring (the
        kernel cancels the entries it still holds) and eventfd. False when
        it did not end: its ring then stays open, never closed under it."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.error("FUSE ring thread %d did not stop; its ring stays open", self.qid)
            return False
        self.io.close()
        os.close(self.wake_fd)
        return True

    # --- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            early = self._register()
        except Exception as e:
            self.error = e if isinstance(e, OSError) else OSError(errno.EIO, f"ring thread: {e!r}")
            return
        finally:
            self._registered.set()
        try:
            self._serve(early)
        except Exception:
            log.exception("FUSE ring thread %d failed", self.qid)
            self.ring.thread_failed(f"ring thread {self.qid} failed")

    def _register(self) -> list[tuple[int, int, int]]:
        """REGISTER every entry (refusals raise); the completions of
        requests the kernel already put in an entry are returned: once the
        last queue has entries, a request can come before we look."""
        # the kernel's name for the thread, as libfuse's: tools (and the
        # benchmark's check) find the ring threads by it
        _prctl(_PR_SET_NAME, f"fuse-ring-{self.qid}".encode(), 0, 0, 0)
        if self.pin:
            try:
                os.sched_setaffinity(0, {self.qid})
            except OSError:
                pass  # that CPU is not ours to run on: serve from anywhere
        self._arm_wake()
        done = register_entries(self.io, self.entries)
        self.live = len(self.entries)
        return done

    def _arm_wake(self) -> None:
        self.io.prep_read(self.wake_fd, ctypes.addressof(self._wake_word), 8, WAKE)

    def _serve(self, early: list[tuple[int, int, int]]) -> None:
        io = self.io
        by_index = {e.index: e for e in self.entries}
        window = self.ring.spin_s
        done = early
        while not self.stopping:
            for user_data, res, _ in done:
                if user_data == WAKE:
                    if self.stopping:
                        return
                    self._arm_wake()
                    continue
                e = by_index[user_data]
                if res < 0:
                    self._lost(e, res)
                    continue
                self._request(e)
            replies = self.replies
            while replies:
                e, unique = replies.popleft()
                queue_commit(self.io, e, unique)
            if not (window and self._spin(window)):
                io.submit(wait=1)  # the commits queued so far, then sleep (no GIL)
            done = io.completions()

    def _spin(self, window: float) -> bool:
        """After a request, the next one often follows within microseconds:
        look for it for `window` seconds (each io_uring_enter runs the task
        work that fills an entry) before sleeping. True when one came."""
        io = self.io
        deadline = time.monotonic() + window
        while True:
            io.submit(getevents=True)
            if io.has_completions():
                return True
            if time.monotonic() > deadline:
                return False

    def _request(self, e: Entry) -> None:
        buf = e.buf
        ring = self.ring
        _, opcode, unique = IN_HEAD.unpack_from(buf, 0)
        rio: RingIO | None = ring.rio
        if rio is not None:
            page = PAGE
            if opcode == abi.READ:
                _, offset, size = READ_HEAD.unpack_from(buf, OP_IN)
                n = rio.read_into(buf[page : page + size], offset)
                if n is not None:
                    OUT.pack_into(buf, 0, 16 + n, 0, unique)
                    PAYLOAD_SZ.pack_into(buf, PAYLOAD_SZ_AT, n)
                    self.reads += 1
                    queue_commit(self.io, e, unique)
                    return
            elif opcode == abi.WRITE:
                _, offset, size, write_flags = WRITE_HEAD.unpack_from(buf, OP_IN)
                # the kernel asks on every direct write of an unprivileged
                # caller; only a set-id bit to clear needs the loop
                if not write_flags & _WRITE_KILL_SUIDGID or not self._setid_to_clear():
                    n = rio.write_from(buf[page : page + size], offset)
                    if n is not None:
                        OUT.pack_into(buf, 0, 16 + WRITE_OUT.size, 0, unique)
                        WRITE_OUT.pack_into(buf, page, n, 0)
                        PAYLOAD_SZ.pack_into(buf, PAYLOAD_SZ_AT, WRITE_OUT.size)
                        self.writes += 1
                        queue_commit(self.io, e, unique)
                        return
        self.handed += 1
        ring.hand_over(e, unique)

    def _setid_to_clear(self) -> bool:
        mode = getattr(self.ring.channel.fs, "mode", None)
        return isinstance(mode, int) and without_setid(mode) != mode

    def _lost(self, e: Entry, res: int) -> None:
        self.live -= 1
        if res not in (-errno.ENOTCONN, -errno.ECANCELED, -errno.ECONNABORTED):
            self.lost += 1
            log.warning("FUSE ring entry %d (queue %d) failed: %s", e.index, e.qid, os.strerror(-res))
