"""The toy in-memory file, mounted over a temp file and driven from another process."""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import signal
import stat
import subprocess

import pytest

from tests.support.fuse import child, pattern, serving
from tests.support.programs import command
from tests.support.toyfs import BLOCK, MemoryFS

SIZE = 3 * 65536 + 1234  # not a multiple of any block size


def filled(size: int = SIZE, **kw) -> MemoryFS:
    fs = MemoryFS(size, **kw)
    fs.data[:] = pattern(size)
    fs.allocated.update(range((size + BLOCK - 1) // BLOCK))
    return fs


async def test_stat_and_statfs(target):
    fs = filled()
    fs.mode = 0o640
    async with serving(fs, target) as session:
        res = await child(
            """
            st = os.stat(sys.argv[1]); vfs = os.statvfs(sys.argv[1])
            out([st.st_size, st.st_mode, st.st_uid, st.st_nlink, st.st_blocks, vfs.f_bsize, vfs.f_blocks])
            """,
            target,
        )
        assert res == [
            SIZE,
            stat.S_IFREG | 0o640,
            os.geteuid(),
            1,
            fs_blocks(fs),
            BLOCK,
            (SIZE + BLOCK - 1) // BLOCK,
        ]
        assert session.count("GETATTR") >= 1
        assert session.count("STATFS") == 1
        info = open("/proc/self/mountinfo").read()
        assert f"{target} " in info and "fuse.exportd exportd:test" in info


def fs_blocks(fs: MemoryFS) -> int:
    return len(fs.allocated) * 8


READ_CODE = """
path, direct = sys.argv[1], sys.argv[2] == "1"
size = os.stat(path).st_size
want = pattern(size)
fd = os.open(path, os.O_RDONLY)
bad = []
for off in [0, 1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 131071, size - 4097, size - 1]:
    for n in [1, 2, 511, 512, 4096, 4097, 8191, 65536, 65537, 200000]:
        got = os.pread(fd, n, off)
        if got != want[off:off + n]:
            bad.append([off, n, len(got)])
os.close(fd)
out(bad)
"""


class ScatterFS(MemoryFS):
    """Answers reads with a list of buffers, the last one running past the
    requested size (the session must cut it)."""

    async def read(self, fh, offset, size):
        view = memoryview(self.data)
        k = min(size, 1000)
        return [bytes(view[offset : offset + k]), view[offset + k : offset + size + 4096]]


@pytest.mark.parametrize("direct_io", [False, True], ids=["cached", "direct_io"])
@pytest.mark.parametrize("fs_class", [MemoryFS, ScatterFS], ids=["bytes", "scatter"])
async def test_read_every_alignment(target, direct_io, fs_class):
    fs = fs_class(SIZE, direct_io=direct_io)
    fs.data[:] = pattern(SIZE)
    async with serving(fs, target) as session:
        assert await child(READ_CODE, target, int(direct_io)) == []
        assert session.count("READ") >= 1


WRITE_CODE = """
path, seed = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY)
ops = []
for i, off in enumerate([0, 1, 511, 4095, 4096, 4097, 65535, 70000, 131072 - 3]):
    for n in [1, 3, 512, 4096, 5000, 65536 + 17]:
        data = pattern(n, seed + i + n)
        os.pwrite(fd, data, off)
        ops.append([off, n, seed + i + n])
os.close(fd)
out(ops)
"""


@pytest.mark.parametrize("direct_io", [False, True], ids=["cached", "direct_io"])
async def test_write_every_alignment(target, direct_io):
    fs = filled(direct_io=direct_io)
    expect = bytearray(fs.data)
    async with serving(fs, target) as session:
        ops = await child(WRITE_CODE, target, 5)
        for off, n, seed in ops:
            expect[off : off + n] = pattern(n, seed)
        # Read back through the mount too (same bytes the handler holds).
        back = await child("out(open(sys.argv[1], 'rb').read().hex())", target)
        assert session.count("WRITE") >= 1
    assert bytes(fs.data) == bytes(expect)
    assert bytes.fromhex(back) == bytes(expect)


async def test_reads_and_writes_crossing_eof(target):
    fs = filled(10000)
    async with serving(fs, target):
        res = await child(
            """
            p = sys.argv[1]
            fd = os.open(p, os.O_RDWR)
            r = [len(os.pread(fd, 100, 9950)), len(os.pread(fd, 100, 10000)), len(os.pread(fd, 100, 20000))]
            os.pwrite(fd, b"x" * 100, 9950)          # crosses EOF: grows to 10050
            r.append(os.fstat(fd).st_size)
            os.pwrite(fd, b"y" * 10, 20000)          # beyond EOF: gap reads as zeroes
            r.append(os.fstat(fd).st_size)
            r.append(os.pread(fd, 20, 10040).hex())
            with open(p, "ab") as f:                 # O_APPEND
                f.write(b"z" * 5)
            r.append(os.stat(p).st_size)
            out(r)
            """,
            target,
        )
    assert r_ok(res)
    assert bytes(fs.data[9950:10050]) == b"x" * 100
    assert bytes(fs.data[10050:20000]) == bytes(9950)
    assert bytes(fs.data[20000:]) == b"y" * 10 + b"z" * 5


def r_ok(res) -> bool:
    assert res[:3] == [50, 0, 0]
    assert res[3:5] == [10050, 20010]
    assert res[5] == (b"x" * 10 + bytes(10)).hex()
    assert res[6] == 20015
    return True


async def test_truncate_chmod_utime_and_o_trunc(target):
    fs = filled(50000)
    async with serving(fs, target) as session:
        res = await child(
            """
            p = sys.argv[1]
            os.truncate(p, 1000); a = os.stat(p).st_size
            os.truncate(p, 70000); b = os.stat(p).st_size
            tail = open(p, "rb").read()[1000:]
            os.chmod(p, 0o600); m = os.stat(p).st_mode & 0o777
            os.utime(p, ns=(1_000_000_123, 2_000_000_456)); st = os.stat(p)
            fd = os.open(p, os.O_WRONLY | os.O_TRUNC); c = os.fstat(fd).st_size
            os.write(fd, b"new"); os.close(fd)
            out([a, b, tail == bytes(69000), m, st.st_atime_ns, st.st_mtime_ns, c, open(p, "rb").read().decode()])
            """,
            target,
        )
        assert session.count("SETATTR") >= 4
    assert res == [1000, 70000, True, 0o600, 1_000_000_123, 2_000_000_456, 0, "new"]
    assert fs.mode == 0o600 and bytes(fs.data) == b"new"


SET_ID_CODE = """
p, what = sys.argv[1], sys.argv[2]
if what == "write":
    fd = os.open(p, os.O_WRONLY); os.pwrite(fd, b"x", 0); os.close(fd)
elif what == "chmod":
    os.chmod(p, int(sys.argv[3], 8))
elif what == "chown":
    os.chown(p, os.getuid(), os.getgid())
out(os.stat(p).st_mode & 0o7777)
"""


async def as_nobody(*argv: str) -> None:
    nobody = pwd.getpwnam("nobody")
    proc = await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=60,
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/",
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")
async def test_set_id_bits_cleared_as_a_local_file_system_would(public_target):
    # The session negotiates HANDLE_KILLPRIV_V2: the kernel leaves clearing
    # set-id bits to us. Root (CAP_FSETID) keeps them; nobody's write or
    # truncate clears them; a chown clears them whoever does it.
    t = public_target
    nobody_write = ("dd", "if=/dev/zero", f"of={t}", "bs=1", "count=1", "conv=notrunc")
    nobody_truncate = ("truncate", "-s", "100", t)
    fs = filled(4096)
    async with serving(fs, t, allow_other=True):

        async def mode(*action: str) -> int:
            return await child(SET_ID_CODE, t, *action)

        assert await mode("chmod", "6777") == 0o6777
        assert await mode("write") == 0o6777  # root
        await as_nobody(*nobody_write)
        assert await mode("stat") == 0o0777
        # group not executable: set-group-ID means mandatory locking, and stays
        assert await mode("chmod", "2767") == 0o2767
        await as_nobody(*nobody_truncate)
        assert await mode("stat") == 0o2767
        assert await mode("chmod", "6777") == 0o6777
        await as_nobody(*nobody_truncate)
        assert await mode("stat") == 0o0777
        assert await mode("chmod", "4777") == 0o4777
        assert await mode("chown") == 0o0777  # root chowns to itself
    assert fs.mode & 0o7777 == 0o777 and len(fs.data) == 100


async def test_fallocate_modes(target):
    fs = filled(64 * 1024)
    async with serving(fs, target) as session:
        res = await child(
            """
            KEEP, PUNCH, ZERO = 1, 2, 0x10
            p = sys.argv[1]
            fd = os.open(p, os.O_RDWR)
            fallocate(fd, PUNCH | KEEP, 8192, 8192)
            a = [os.fstat(fd).st_size, os.pread(fd, 8192, 8192) == bytes(8192), os.pread(fd, 1, 8191) != b"\\0",
                 os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 8192, os.SEEK_DATA)]
            fallocate(fd, ZERO, 60000, 10000)             # zero range, extends the file
            b = [os.fstat(fd).st_size, os.pread(fd, 10000, 60000) == bytes(10000)]
            fallocate(fd, 0, 0, 100000)                   # plain preallocation
            c = os.fstat(fd).st_size
            fallocate(fd, KEEP, 0, 200000)                # keep size
            d = os.fstat(fd).st_size
            try:
                fallocate(fd, 0x08, 0, 4096)              # collapse range: the kernel refuses it
                e = 0
            except OSError as exc:
                e = exc.errno
            os.close(fd)
            out([a, b, c, d, e])
            """,
            target,
        )
        assert session.count("FALLOCATE") == 4
    assert res == [
        [65536, True, True, 8192, 16384],
        [70000, True],
        100000,
        100000,
        errno.EOPNOTSUPP,
    ]
    assert len(fs.data) == 100000


async def test_seek_data_and_hole(target):
    fs = MemoryFS(10 * BLOCK)
    fs.data[2 * BLOCK : 4 * BLOCK] = b"\1" * (2 * BLOCK)
    fs.allocated.update({2, 3, 7})
    async with serving(fs, target) as session:
        res = await child(
            """
            fd = os.open(sys.argv[1], os.O_RDONLY)
            r = []
            for off, whence in [(0, os.SEEK_DATA), (100, os.SEEK_HOLE), (2 * 4096 + 5, os.SEEK_DATA),
                                (2 * 4096 + 5, os.SEEK_HOLE), (4 * 4096, os.SEEK_DATA), (8 * 4096, os.SEEK_HOLE),
                                (8 * 4096, os.SEEK_DATA), (10 * 4096, os.SEEK_DATA)]:
                try:
                    r.append(os.lseek(fd, off, whence))
                except OSError as e:
                    r.append(-e.errno)
            out(r)
            """,
            target,
        )
        assert session.count("LSEEK") >= 1
    B = BLOCK
    assert res == [2 * B, 100, 2 * B + 5, 4 * B, 7 * B, 8 * B, -errno.ENXIO, -errno.ENXIO]


async def test_fsync_and_flush(target):
    async with serving(filled(), target) as session:
        await child(
            """
            fd = os.open(sys.argv[1], os.O_RDWR)
            os.pwrite(fd, b"abc", 0); os.fsync(fd); os.fdatasync(fd); os.close(fd)
            out(1)
            """,
            target,
        )
        assert session.count("FSYNC") == 2
        assert session.count("FLUSH") >= 1
        for _ in range(500):  # RELEASE is sent asynchronously after close
            if session.count("RELEASE"):
                break
            await asyncio.sleep(0.01)
        assert session.count("RELEASE") >= 1


async def test_shared_mmap(target):
    fs = filled(5 * BLOCK)
    async with serving(fs, target):
        res = await child(
            """
            with open(sys.argv[1], "r+b") as f:
                m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
                first = m[:4].hex()
                m[4096:4096 + 6] = b"mmaped"
                m.flush(); m.close()
            out(first)
            """,
            target,
        )
    assert res == pattern(4).hex()
    assert bytes(fs.data[4096 : 4096 + 6]) == b"mmaped"


async def test_cp_and_dd(target, workdir):
    fs = filled(2 * 1024 * 1024 + 777)
    src = workdir / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    copy = workdir / "copy.bin"
    async with serving(fs, target):
        await command("cp", target, str(copy))
        assert copy.read_bytes() == pattern(len(fs.data))
        await command("cp", str(src), target)  # open(O_TRUNC) + writes
        assert bytes(fs.data) == src.read_bytes()
        await command(
            "dd",
            f"if={src}",
            f"of={target}",
            "bs=1M",
            "seek=1",
            "conv=notrunc,fsync",
            "status=none",
        )
        await command("dd", f"if={target}", f"of={copy}", "bs=1M", "iflag=direct", "status=none")
    want = src.read_bytes()
    want = want[: 1 << 20] + want
    assert bytes(fs.data) == want
    assert copy.read_bytes() == want


class FaultyFS(MemoryFS):
    async def write(self, fh, offset, data):
        if offset >= 1 << 20:
            raise OSError(errno.ENOSPC, "full")
        if offset == 12345:
            raise ValueError("a bug in the handler")
        await asyncio.sleep(0)  # suspend: error after the first await
        return await super().write(fh, offset, data)


async def test_handler_errors_reach_caller_and_session_keeps_serving(target, caplog):
    fs = FaultyFS(4096, direct_io=True)
    async with serving(fs, target) as session:
        res = await child(
            """
            fd = os.open(sys.argv[1], os.O_RDWR)
            r = []
            for off in (1 << 20, 12345, 0):
                try:
                    r.append(os.pwrite(fd, b"data", off))
                except OSError as e:
                    r.append(-e.errno)
            try:
                os.getxattr(sys.argv[1], "user.x")
            except OSError as e:
                r.append(-e.errno)
            out(r)
            """,
            target,
        )
        assert res == [-errno.ENOSPC, -errno.EIO, 4, -errno.EOPNOTSUPP]
        assert "a bug in the handler" in caplog.text
        assert session.count("GETXATTR") == 1  # answered ENOSYS
        assert not session.closed.done()
    assert bytes(fs.data[:4]) == b"data"


class SlowFS(MemoryFS):
    """Reads wait a little, several times, like a real disk-backed node would."""

    async def read(self, fh, offset, size):
        for _ in range(3):
            await asyncio.sleep(0.001)
        return await super().read(fh, offset, size)


async def test_many_requests_in_flight(target):
    fs = SlowFS(8 << 20, direct_io=True)
    fs.data[:] = pattern(len(fs.data))
    async with serving(fs, target) as session:
        res = await child(
            """
            import threading
            p = sys.argv[1]; want = pattern(8 << 20); bad = []
            def worker(k):
                fd = os.open(p, os.O_RDONLY)
                for i in range(40):
                    off = ((k * 40 + i) * 200003) % ((8 << 20) - 70000)
                    if os.pread(fd, 65536, off) != want[off:off + 65536]:
                        bad.append(off)
                os.close(fd)
            ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            [t.start() for t in ts]; [t.join() for t in ts]
            out(bad)
            """,
            target,
        )
        assert res == []
        assert session.count("READ") >= 320
        assert session.in_flight == 0


async def test_slow_read_does_not_stall_getattr(target):
    fs = filled(direct_io=True)
    async with serving(fs, target) as session:
        fs.hang_reads = True
        reader = asyncio.create_task(
            child(
                "fd = os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 10, 0)",
                target,
                check=False,
                timeout=30,
            )
        )
        await asyncio.wait_for(fs.hung.wait(), 10)
        # The read is stuck in its handler; stat and statfs still answer.
        res = await child("out(os.stat(sys.argv[1]).st_size)", target, timeout=10)
        assert res == SIZE
        assert session.in_flight == 1
        fs.hang_reads = False
        await session.close()  # cancels the stuck handler; the reader gets an error
        proc = await reader
        assert proc.returncode != 0
    assert fs.ended == "closed"


class SlowWriteFS(MemoryFS):
    """Writes wait before touching the data: large payloads must stay intact
    in the shared receive buffer while other requests are read meanwhile."""

    largest = 0

    async def write(self, fh, offset, data):
        self.largest = max(self.largest, len(data))
        await asyncio.sleep(0.002)
        await asyncio.sleep(0)
        return await super().write(fh, offset, data)


async def test_large_writes_in_flight_keep_their_buffers(target):
    fs = SlowWriteFS(16 << 20, direct_io=True)
    async with serving(fs, target) as session:
        await child(
            """
            import threading
            p = sys.argv[1]
            def worker(k):
                fd = os.open(p, os.O_WRONLY)
                m = mmap.mmap(-1, 1 << 20)  # page-aligned: one request per write
                for i in range(4):
                    off = (k * 4 + i) << 20
                    m[:] = pattern(1 << 20, k * 4 + i)
                    os.pwrite(fd, m, off)
                os.close(fd)
            ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            [t.start() for t in ts]; [t.join() for t in ts]
            out(1)
            """,
            target,
        )
        assert session.count("WRITE") == 16
        assert session.in_flight == 0
    assert fs.largest == 1 << 20  # 1 MiB requests (max_pages) reached the handler whole
    for j in range(16):
        assert bytes(fs.data[j << 20 : (j + 1) << 20]) == pattern(1 << 20, j), j


class MisbehavingFS(MemoryFS):
    """Breaks the contract in ways a buggy export could."""

    def read(self, fh, offset, size):  # not a coroutine
        return b"oops"

    async def statfs(self):
        return None  # not a StatFs


async def test_contract_violations_become_eio_not_hangs(target, caplog):
    fs = MisbehavingFS(4096, direct_io=True)
    async with serving(fs, target) as session:
        res = await child(
            """
            r = []
            fd = os.open(sys.argv[1], os.O_RDWR)
            for call in (lambda: os.pread(fd, 4, 0), lambda: os.statvfs(sys.argv[1])):
                try:
                    call(); r.append(0)
                except OSError as e:
                    r.append(e.errno)
            r.append(os.pwrite(fd, b"ok", 0))
            out(r)
            """,
            target,
        )
        assert res == [errno.EIO, errno.EIO, 2]
        assert caplog.text.count("request handler failed") == 2
        assert not session.closed.done()


class ThreadedWriteFS(MemoryFS):
    """Large writes copied in a worker thread, as a disk-backed node would."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hang_writes = False
        self.release = asyncio.Event()

    async def write(self, fh, offset, data):
        if self.hang_writes:
            self.hung.set()
            await self.release.wait()
        return await asyncio.to_thread(self._write_now, offset, bytes(data))

    def _write_now(self, offset, data):
        self.data[offset : offset + len(data)] = data
        return len(data)


async def test_interrupted_large_write_is_not_cancelled(target):
    """A WRITE is not cancelled by INTERRUPT (its I/O may already be under way
    in a thread; an EINTR answer would let it land after a newer write): it
    finishes, answers the full count, and its receive buffer goes back."""
    fs = ThreadedWriteFS(4 << 20, direct_io=True)
    async with serving(fs, target) as session:
        from exportd.fuse.buffers import pool_for
        from exportd.fuse.channel import BUFFER_SIZE

        pool = pool_for(asyncio.get_running_loop(), BUFFER_SIZE)
        fs.hang_writes = True
        writer = asyncio.create_task(
            child(
                """
                import signal
                signal.signal(signal.SIGUSR1, lambda *a: None)
                libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
                libc.pwrite.restype = ctypes.c_ssize_t
                fd = os.open(sys.argv[1], os.O_WRONLY)
                m = mmap.mmap(-1, 1 << 20)
                buf = (ctypes.c_char * (1 << 20)).from_buffer(m)
                n = libc.pwrite(fd, buf, 1 << 20, 0)
                out([n, ctypes.get_errno() if n < 0 else 0])
                """,
                target,
                timeout=30,
            )
        )
        await asyncio.wait_for(fs.hung.wait(), 20)
        allocated = pool.allocated
        assert allocated >= 2  # the read loop moved on to another buffer
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_writer(p, target))
        os.kill(pid, signal.SIGUSR1)
        for _ in range(200):
            if session.count("INTERRUPT"):
                break
            await asyncio.sleep(0.05)
        assert session.count("INTERRUPT") == 1
        await asyncio.sleep(0.2)  # a cancelled handler would have answered by now
        assert not writer.done()
        fs.hang_writes = False
        fs.release.set()
        assert await writer == [1 << 20, 0]
        assert bytes(fs.data[: 1 << 20]) == bytes(1 << 20)
        assert pool.allocated == allocated  # the buffer was returned, not dropped
        assert session.count("WRITE") == 1


def _is_writer(pid: str, target: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"libc.pwrite" in cmd and target.encode() in cmd
