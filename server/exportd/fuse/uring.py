"""FUSE over io_uring: a second transport for one session's requests.

After INIT negotiated FUSE_OVER_IO_URING, the session registers ring
entries with the kernel (IORING_OP_URING_CMD on the /dev/fuse fd,
FUSE_IO_URING_CMD_REGISTER): `depth` entries for each of the kernel's
queues, one queue per possible CPU (the kernel queues a request on the queue
of the CPU its caller runs on). Once every queue has an entry, the kernel
sends every request through the ring instead of /dev/fuse: it copies the
request into a free entry and completes that entry's command (a CQE). We
answer with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which hands the reply over
and makes the entry available for the next request in one step (and, when
one is waiting, fills it at once). INTERRUPT, FORGET and our notifications
still go through /dev/fuse.

Everything runs on the loop's thread, as /dev/fuse does: the ring's fd is
watched with loop.add_reader (readable when the CQ holds completions) and
by the busy poller, and a drain hands each request to the channel's opcode
table (channel.dispatch). Replies come back through channel.write, which
commits them here when their unique came through the ring. Commits made
while draining are submitted together, with one io_uring_enter.

An entry's memory, from its page-aligned start:

    [0, 288)              struct fuse_uring_req_header (kernel's iov[0]):
                          in_out[128] (fuse_in_header, then fuse_out_header),
                          op_in[128] (the opcode's own header),
                          ring_ent_in_out (flags, commit_id, payload_sz)
    [PAGE-128, PAGE)      the opcode header copied just before the payload,
    [PAGE, PAGE+payload)  so that the decoders of requests.py see the same
                          contiguous body as from /dev/fuse (kernel's iov[1])
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from . import abi
from .filesystem import RingIO
from .iouring import OP_URING_CMD, SETUP_COOP_TASKRUN, IoUring

if TYPE_CHECKING:
    from .channel import Channel
    from .ringthread import QueueThread

log = logging.getLogger(__name__)

ENABLE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2
HEADER_SIZE = 288  # sizeof(struct fuse_uring_req_header)
OP_IN = 128  # offset of op_in
ENT_IN_OUT = 256  # offset of ring_ent_in_out
OP_IN_MAX = 128
PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_DEPTH = 8  # entries per queue, as libfuse
# Requests handled per readiness callback before yielding to other sessions.
BURST = 32
# How long closing waits for the ring threads to answer what they hold.
THREAD_STOP_S = 5.0

IN_HEAD = struct.Struct("<IIQ")  # fuse_in_header: len, opcode, unique
PAYLOAD_SZ = struct.Struct("<I")  # ring_ent_in_out.payload_sz, at ENT_IN_OUT + 16
PAYLOAD_SZ_AT = ENT_IN_OUT + 16
# The first 72 bytes of a URING_CMD SQE: opcode, flags, ioprio, fd, cmd_op,
# pad, addr (iovec array), len (2), uring_cmd_flags, user_data, buf_index,
# personality, file_index, then struct fuse_uring_cmd_req: flags,
# commit_id, qid, padding.
SQE_HEAD = struct.Struct("<BBHiIIQIIQHHiQQH6x")
COMMIT_ID_AT = 56
_IOVEC = ctypes.c_uint64 * 4  # two struct iovec (base, len)


def parameter_state() -> str:
    """'Y' or 'N' from the module parameter, '' when the kernel has none."""
    try:
        with open(ENABLE_PARAMETER) as f:
            return f.read().strip()[:1]
    except OSError:
        return ""


def unavailable_reason() -> str:
    """Why this kernel will not offer FUSE over io_uring ('' when it will)."""
    state = parameter_state()
    if not state:
        return f"this kernel has no FUSE over io_uring ({ENABLE_PARAMETER} does not exist)"
    if state != "Y":
        return (
            f"FUSE over io_uring is disabled in the kernel ({ENABLE_PARAMETER} is {state}; "
            f"as root: echo Y > {ENABLE_PARAMETER})"
        )
    return ""


def possible_cpus() -> int:
    """The kernel's queue count: num_possible_cpus()."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def depth_from_env() -> int:
    try:
        return max(1, int(os.environ.get("EXPORTD_FUSE_URING_DEPTH", "") or DEFAULT_DEPTH))
    except ValueError:
        return DEFAULT_DEPTH


class Entry:
    """One registered ring entry (header and payload buffers)."""

    __slots__ = ("index", "qid", "buf", "iov", "sqe", "register_sqe")

    def __init__(self, index: int, qid: int, buf: memoryview, addr: int, payload: int) -> None:
        self.index = index
        self.qid = qid
        self.buf = buf
        self.iov = _IOVEC(addr, HEADER_SIZE, addr + PAGE, payload)  # kept alive for the kernel
        self.sqe = b""  # this entry's COMMIT_AND_FETCH SQE head, commit_id 0 (set by FuseRing)
        self.register_sqe = b""  # and its REGISTER


def register_entries(io: IoUring, entries: list[Entry]) -> list[tuple[int, int, int]]:
    """REGISTER `entries` on `io`. REGISTER runs at submission, so a refusal
    is already in the CQ: raised, with its errno. So may be a request: once
    the last queue has entries, one can come before we look. The other
    completions are returned for the caller to serve."""
    for e in entries:
        off = io.next_sqe()
        io.sqes[off : off + SQE_HEAD.size] = e.register_sqe
        io.queued()
    while io.unsubmitted:
        if not io.submit():
            raise OSError(errno.EAGAIN, "io_uring_enter consumed no REGISTER")
    done = io.completions()
    ours = {e.index for e in entries}
    for user_data, res, _ in done:
        if user_data in ours and res < 0:
            raise OSError(-res, f"the kernel refused the ring entries: {os.strerror(-res)}")
    return done


def queue_commit(io: IoUring, e: Entry, unique: int) -> None:
    """Queue `e`'s COMMIT_AND_FETCH answering `unique` (its reply is in its buffer)."""
    off = io.next_sqe()
    sqes = io.sqes
    sqes[off : off + SQE_HEAD.size] = e.sqe
    struct.pack_into("<Q", sqes, off + COMMIT_ID_AT, unique)
    io.queued()


def threads_from_env() -> bool:
    """Whether queues may get a thread each (ringthread.py), where the file
    system offers something for them to answer (SingleFileFS.ring_io):
    EXPORTD_FUSE_URING_THREADS, 1 (the default), 0 (the ring always drives
    the loop) or `one` (one thread for every queue; bench/README.md, Levers)."""
    return os.environ.get("EXPORTD_FUSE_URING_THREADS", "1") != "0"


class FuseRing:
    """The ring of one session; see the module docstring. With `rio` (what
    threads may answer themselves), each queue has an io_uring and a thread
    of its own (ringthread.py) and the loop sees only what those threads
    hand over; without, one io_uring holds every queue and the loop drains
    it."""

    def __init__(
        self, channel: Channel, *, queues: int, depth: int, payload: int, rio: RingIO | None = None,
    ) -> None:
        self.channel = channel
        self.queues = queues
        self.depth = depth
        self.rio = rio
        self.threaded = threaded = rio is not None
        n = queues * depth
        self.ring: IoUring | None = None if threaded else IoUring(n, flags=SETUP_COOP_TASKRUN)
        self.fd = -1 if self.ring is None else self.ring.fd
        self.stride = PAGE + payload
        # one anonymous mapping for every entry; pages are only backed once
        # touched, and the memory is never unmapped by hand (a worker thread
        # may still copy out of a cancelled WRITE's payload): it goes with
        # its last view.
        self.memory = mmap.mmap(-1, n * self.stride)
        view = memoryview(self.memory)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.entries = [
            Entry(i, i // depth, view[i * self.stride : (i + 1) * self.stride],
                  base + i * self.stride, payload)
            for i in range(n)
        ]
        for e in self.entries:
            e.sqe = self._sqe_head(e, CMD_COMMIT_AND_FETCH, 0)
            e.register_sqe = self._sqe_head(e, CMD_REGISTER, 0)
        self.by_unique: dict[int, Entry] = {}  # requests in the loop's hands
        self.live = 0  # entries the kernel holds (registered or fetching)
        self.failed = ""  # why registration failed
        self.lost = 0  # entries the kernel gave back with an error while connected
        self._served = 0  # requests the loop handled (tests, benchmarks)
        # threaded: the threads, and what they may answer themselves
        self.threads: list[QueueThread] = []
        self.spin_s = float(os.environ.get("EXPORTD_FUSE_URING_SPIN_US", "0") or 0) / 1e6
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._draining = False
        self._early: list[tuple[int, int, int]] = []  # requests seen while registering
        self._retry: asyncio.TimerHandle | None = None

    def _sqe_head(self, e: Entry, cmd: int, commit_id: int) -> bytes:
        return SQE_HEAD.pack(
            OP_URING_CMD, 0, 0, self.channel.fd, cmd, 0, ctypes.addressof(e.iov), 2, 0,
            e.index, 0, 0, 0, 0, commit_id, e.qid,
        )

    @property
    def served(self) -> int:
        """Requests that came through the ring (tests, benchmarks)."""
        return self._served + sum(t.reads + t.writes for t in self.threads)

    # --- set-up -------------------------------------------------------------------

    def register(self) -> None:
        """Hand every entry to the kernel. Raises OSError when the kernel
        refuses (its errno), after which the session stays on /dev/fuse."""
        if self.threaded:
            self._start_threads()
            return
        assert self.ring is not None
        try:
            self._early = register_entries(self.ring, self.entries)  # the first drain() serves them
        except OSError as e:
            self.failed = e.strerror or str(e)
            raise
        self.live = len(self.entries)

    def _start_threads(self) -> None:
        from .ringthread import QueueThread  # it needs this module's layout

        pin = os.environ.get("EXPORTD_FUSE_URING_PIN", "1") != "0"
        groups = [self.entries[q * self.depth : (q + 1) * self.depth] for q in range(self.queues)]
        if os.environ.get("EXPORTD_FUSE_URING_THREADS") == "one":
            groups = [self.entries]
            pin = False
        for qid, entries in enumerate(groups):
            t = QueueThread(self, qid, entries, pin)
            self.threads.append(t)
            try:
                t.start()
            except OSError as e:
                self.failed = e.strerror or str(e)
                raise
            self.live += t.live

    def close(self) -> None:
        """Close the ring: the kernel cancels the entries it still holds."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.live = 0
        self.by_unique.clear()
        self.fd = -1
        # every thread finishes the request it holds (a local file's I/O) at once
        for t in self.threads:
            t.signal_stop()
        deadline = time.monotonic() + THREAD_STOP_S
        stopped = all([t.stop(max(0.0, deadline - time.monotonic())) for t in self.threads])
        if self.threads:
            log.info(
                "%s: FUSE ring threads answered %d READ and %d WRITE themselves, handed %d requests to the loop",
                self.channel.owner.mountpoint, sum(t.reads for t in self.threads),
                sum(t.writes for t in self.threads), sum(t.handed for t in self.threads),
            )
        if self.ring is not None:
            self.ring.close()
        if self.rio is not None and stopped:
            # (a thread still inside keeps the views registered: later
            # quiesces still wait for its write)
            self.rio.close()

    # --- from the ring threads ----------------------------------------------------

    def hand_over(self, e: Entry, unique: int) -> None:
        """A ring thread's request for the loop (called on that thread)."""
        self.by_unique[unique] = e
        self._loop.call_soon_threadsafe(self._handed, e)

    def _handed(self, e: Entry) -> None:
        if self._closed or not self.channel.reading:
            return
        if self.rio is not None:
            try:
                self.rio.refresh()  # the thread may have declined a stale view
            except OSError as exc:  # no descriptor for a view (EMFILE): the loop serves
                log.warning("%s: no view for ring threads: %s", self.channel.owner.mountpoint, exc)
        self._request(self.channel, e)

    def thread_failed(self, reason: str) -> None:
        self._loop.call_soon_threadsafe(self.channel.owner.halt, reason)

    # --- requests -----------------------------------------------------------------

    def drain(self) -> bool:
        """Handle the requests the kernel put in the ring (up to BURST), then
        submit the commits made meanwhile. True when nothing of the
        session is in flight afterwards (busypoll.py)."""
        ring = self.ring
        assert ring is not None
        ch = self.channel
        handled = 0
        self._draining = True
        try:
            while handled < BURST:
                done, self._early = self._early or ring.completions(), []
                if not done:
                    break
                for index, res, _ in done:
                    e = self.entries[index]
                    if res < 0:
                        self._lost(e, res)
                        continue
                    handled += 1
                    self._request(ch, e)
                if ring.unsubmitted:
                    ring.submit()  # the commits may fetch waiting requests at once
        finally:
            self._draining = False
            self.flush()
        return not ch.in_flight and not self.by_unique

    def flush(self) -> None:
        """Submit what is queued. Commits the kernel could not take yet
        (EAGAIN, EBUSY) are tried again a millisecond later: a request whose
        answer stays in the SQ would wait forever."""
        ring = self.ring
        if ring is None or ring.fd < 0 or not ring.unsubmitted:
            return
        ring.submit()
        if ring.unsubmitted and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(1e-3, self._retried)

    def _retried(self) -> None:
        self._retry = None
        self.flush()

    def _request(self, ch: Channel, e: Entry) -> None:
        buf = e.buf
        length, opcode, unique = IN_HEAD.unpack_from(buf, 0)
        payload = PAYLOAD_SZ.unpack_from(buf, PAYLOAD_SZ_AT)[0]
        op_size = length - 40 - payload
        if not 0 <= op_size <= OP_IN_MAX:
            ch.owner.halt(f"ring request of {length} bytes with {payload} of payload (opcode {opcode})")
            return
        start = PAGE - op_size
        buf[start:PAGE] = buf[OP_IN : OP_IN + op_size]
        self.by_unique[unique] = e
        self._served += 1
        ch.dispatch(opcode, unique, buf, start, PAGE + payload)

    def _lost(self, e: Entry, res: int) -> None:
        """The kernel gave an entry back without a request: the connection
        is over (ENOTCONN, ECANCELED, ECONNABORTED) or a command failed; the
        entry then no longer serves its queue."""
        self.live -= 1
        if res not in (-errno.ENOTCONN, -errno.ECANCELED, -errno.ECONNABORTED):
            self.lost += 1
            log.warning(
                "%s: FUSE ring entry %d (queue %d) failed: %s",
                self.channel.owner.mountpoint, e.index, e.qid, os.strerror(-res),
            )

    # --- replies ------------------------------------------------------------------

    def commit(self, unique: int, parts: tuple[Any, ...]) -> bool:
        """Answer `unique` through its entry: False when it did not come
        through the ring (the channel then writes to /dev/fuse)."""
        e = self.by_unique.pop(unique, None)
        if e is None:
            return False
        buf = e.buf
        if self._closed:
            return True  # nobody to answer
        buf[0:16] = parts[0]
        at = PAGE
        for part in parts[1:]:
            n = len(part)
            buf[at : at + n] = part
            at += n
        PAYLOAD_SZ.pack_into(buf, PAYLOAD_SZ_AT, at - PAGE)
        ring = self.ring
        if ring is None:
            self.threads[e.qid if len(self.threads) > 1 else 0].hand_back(e, unique)
            return True
        queue_commit(ring, e, unique)
        if not self._draining:
            self.flush()
        return True

    def payload_of(self, unique: int) -> memoryview | None:
        """The payload buffer of a ring request still to be answered: READ
        replies are read straight into it (readreply.py)."""
        e = self.by_unique.get(unique)
        return None if e is None else e.buf[PAGE:]


assert SQE_HEAD.size == 72
assert abi.IN_HEADER.size == 40
