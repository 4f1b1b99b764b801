"""A minimal io_uring over the raw system calls (ctypes), for URING_CMD.

Only what FUSE over io_uring needs: io_uring_setup with 128-byte SQEs
(IORING_SETUP_SQE128: a URING_CMD's command lives in the SQE's second
half), the SQ and CQ rings and the SQE array mapped into our memory, SQEs
written in place with struct.pack_into, io_uring_enter to submit, and the
CQ read from memory. Each ring is used by one thread (the loop's, or a
ring thread's: ringthread.py); x86-64
and arm64 order plain loads and stores as the ring protocol needs here (the
tail is stored after the SQE, read before the CQEs), and Python performs
each as one store or load in program order.

Why ctypes and not a binding: the interface is three system calls and two
mmaps, the URING_CMD SQE layout (cmd_op, the 80-byte command area) is what
bindings expose least well, and no build dependency is added. Calls that
do not wait go through PyDLL (the GIL stays held: a submit is a few
microseconds and no other thread of ours needs it meanwhile).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

_SYSCALLS = {
    # machine: (io_uring_setup, io_uring_enter); the same on every 64-bit arch
    "x86_64": (425, 426),
    "aarch64": (425, 426),
}

SETUP_SQE128 = 1 << 10
SETUP_COOP_TASKRUN = 1 << 8
FEAT_SINGLE_MMAP = 1 << 0
ENTER_GETEVENTS = 1 << 0
OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000

OP_READ = 22
OP_URING_CMD = 46
SQE_SIZE = 128  # with SETUP_SQE128
CQE = struct.Struct("<QiI")  # user_data, res, flags

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu,
# sq_thread_idle, features, wq_fd, resv[3], then io_sqring_offsets (head,
# tail, ring_mask, ring_entries, flags, dropped, array, resv1, user_addr)
# and io_cqring_offsets (head, tail, ring_mask, ring_entries, overflow,
# cqes, flags, resv1, user_addr)
_PARAMS = struct.Struct("<10I" + "8IQ" + "8IQ")

_PROT_RW = 0x1 | 0x2
_MAP_SHARED_POPULATE = 0x01 | 0x8000

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Syscall(ctypes._CFuncPtr):  # type: ignore[name-defined]
    """syscall(2), releasing the GIL while it runs."""

    _argtypes_ = [ctypes.c_long] * 7
    _restype_ = ctypes.c_long
    _flags_ = ctypes._FUNCFLAG_CDECL | ctypes._FUNCFLAG_USE_ERRNO  # type: ignore[attr-defined]


class _SyscallGil(_Syscall):
    """syscall(2) keeping the GIL (for calls that never wait)."""

    _flags_ = _Syscall._flags_ | ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


_syscall = _Syscall(("syscall", _libc))
_syscall_gil = _SyscallGil(("syscall", _libc))


def supported_here() -> str:
    """'' when this machine's architecture is known here, else why not."""
    machine = platform.machine()
    return "" if machine in _SYSCALLS else f"io_uring system call numbers unknown for {machine}"


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _map(fd: int, length: int, offset: int) -> int:
    addr = _mmap(None, length, _PROT_RW, _MAP_SHARED_POPULATE, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the io_uring: {os.strerror(err)}")
    return addr


def _view(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


class IoUring:
    """One io_uring instance with SQE128; see the module docstring."""

    def __init__(self, entries: int, *, flags: int = 0) -> None:
        reason = supported_here()
        if reason:
            raise OSError(errno.ENOSYS, reason)
        self._setup_nr, self._enter_nr = _SYSCALLS[platform.machine()]
        params = ctypes.create_string_buffer(_PARAMS.size)
        struct.pack_into("<I", params, 8, flags | SETUP_SQE128)
        self.fd = _check(_syscall(self._setup_nr, entries, ctypes.addressof(params), 0, 0, 0, 0))
        self._maps: list[tuple[int, int]] = []
        try:
            self._map_rings(_PARAMS.unpack(params.raw))
        except BaseException:
            self.close()
            raise

    def _map_rings(self, p: tuple[int, ...]) -> None:
        sq_entries, cq_entries, _, _, _, features = p[:6]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * CQE.size
        if features & FEAT_SINGLE_MMAP:
            size = max(sq_size, cq_size)
            sq_addr = cq_addr = _map(self.fd, size, OFF_SQ_RING)
            self._maps.append((sq_addr, size))
        else:
            sq_addr = _map(self.fd, sq_size, OFF_SQ_RING)
            self._maps.append((sq_addr, sq_size))
            cq_addr = _map(self.fd, cq_size, OFF_CQ_RING)
            self._maps.append((cq_addr, cq_size))
        sqes_addr = _map(self.fd, sq_entries * SQE_SIZE, OFF_SQES)
        self._maps.append((sqes_addr, sq_entries * SQE_SIZE))
        self.sq = _view(sq_addr, sq_size)
        self.cq = _view(cq_addr, cq_size)
        self.sqes = _view(sqes_addr, sq_entries * SQE_SIZE)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self._sq_head, self._sq_tail = sq_head, sq_tail
        self._cq_head, self._cq_tail = cq_head, cq_tail
        self._cqes = cqes
        self.sq_mask = struct.unpack_from("<I", self.sq, sq_mask)[0]
        self.cq_mask = struct.unpack_from("<I", self.cq, cq_mask)[0]
        # the SQ array maps slot i to SQE i, once and for all
        for i in range(sq_entries):
            struct.pack_into("<I", self.sq, sq_array + 4 * i, i)
        self.tail = struct.unpack_from("<I", self.sq, sq_tail)[0]
        self.unsubmitted = 0

    # --- submission ---------------------------------------------------------------

    def next_sqe(self) -> int:
        """The offset in `sqes` of the next free SQE (the caller fills all of
        its first 72 bytes, then calls queued()). Raises when the SQ is full."""
        head = struct.unpack_from("<I", self.sq, self._sq_head)[0]
        if (self.tail - head) & 0xFFFFFFFF >= self.sq_entries:
            raise OSError(errno.EBUSY, "io_uring submission queue full")
        return (self.tail & self.sq_mask) * SQE_SIZE

    def prep_read(self, fd: int, addr: int, length: int, user_data: int) -> None:
        """Queue a read(2) of `length` bytes at `addr` (an eventfd's counter)."""
        off = self.next_sqe()
        self.sqes[off : off + 64] = bytes(64)
        struct.pack_into("<BBHiQQIIQ", self.sqes, off, OP_READ, 0, 0, fd, (1 << 64) - 1, addr, length, 0, user_data)
        self.queued()

    def queued(self) -> None:
        """Publish the SQE filled at next_sqe()."""
        self.tail = (self.tail + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.sq, self._sq_tail, self.tail)
        self.unsubmitted += 1

    def submit(self, wait: int = 0, *, getevents: bool = False) -> int:
        """Submit what is queued; with `wait`, also wait for that many
        completions (the GIL is then released). `getevents` without `wait`
        runs the ring's pending task work (completions that need us)."""
        done = 0
        for _ in range(8):  # a few tries: EINTR, or a partial submission
            n = self.unsubmitted
            if wait:
                ret = _syscall(self._enter_nr, self.fd, n, wait, ENTER_GETEVENTS, 0, 0, 0)
            else:
                ret = _syscall_gil(self._enter_nr, self.fd, n, 0, ENTER_GETEVENTS if getevents else 0, 0, 0, 0)
            if ret < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EBUSY):
                    break  # nothing consumed; the caller tries again later
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            self.unsubmitted = n - ret
            done += ret
            if not self.unsubmitted or not ret:
                break
            wait = 0
        return done

    # --- completion ---------------------------------------------------------------

    def completions(self) -> list[tuple[int, int, int]]:
        """Every CQE posted so far, as (user_data, res, flags), consumed."""
        cq = self.cq
        head = struct.unpack_from("<I", cq, self._cq_head)[0]
        tail = struct.unpack_from("<I", cq, self._cq_tail)[0]
        if head == tail:
            return []
        out = []
        mask = self.cq_mask
        base = self._cqes
        unpack = CQE.unpack_from
        while head != tail:
            out.append(unpack(cq, base + (head & mask) * CQE.size))
            head = (head + 1) & 0xFFFFFFFF
        struct.pack_into("<I", cq, self._cq_head, head)
        return out

    def has_completions(self) -> bool:
        cq = self.cq
        return struct.unpack_from("<I", cq, self._cq_head)[0] != struct.unpack_from(
            "<I", cq, self._cq_tail
        )[0]

    def close(self) -> None:
        """Unmap and close: the kernel then cancels what is still pending."""
        for name in ("sq", "cq", "sqes"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()
        for addr, size in self._maps:
            _munmap(addr, size)
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
