"""Sessions: many at once, INTERRUPT, passthrough, ends from outside, stale mounts."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from exportd.fuse import mount as fuse_mount
from exportd.fuse.buffers import pool_for
from exportd.fuse.channel import BUFFER_SIZE
from exportd.fuse.mount import MountError
from exportd.fuse.passthrough import PassthroughUnavailable
from exportd.fuse.session import FuseSession
from tests.support.fuse import child, pattern, serving, start_toy
from tests.support.programs import command
from tests.support.toyfs import FileFS, MemoryFS


async def test_twenty_sessions_on_one_loop(workdir):
    n = 20
    targets, filesystems, sessions = [], [], []
    try:
        for i in range(n):
            t = workdir / f"e{i}.img"
            t.write_bytes(b"")
            fs = MemoryFS(256 * 1024)
            fs.data[:] = pattern(len(fs.data), seed=i)
            fs.allocated.update(range(64))
            targets.append(str(t))
            filesystems.append(fs)
            sessions.append(await FuseSession.start(fs, str(t), fsname=f"exportd:e{i}"))
        res = await child(
            """
            import threading
            paths = sys.argv[1:]; bad = []
            def worker(i, p):
                fd = os.open(p, os.O_RDWR)
                for k in range(10):
                    off = k * 20000
                    if os.pread(fd, 30000, off) != pattern(256 * 1024, i)[off:off + 30000]:
                        bad.append([i, off])
                os.pwrite(fd, b"session %d" % i, 100)
                os.close(fd)
            ts = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(paths)]
            [t.start() for t in ts]; [t.join() for t in ts]
            out(bad)
            """,
            *targets,
        )
        assert res == []
        for i, (fs, s) in enumerate(zip(filesystems, sessions, strict=True)):
            assert bytes(fs.data[100 : 100 + len(b"session %d" % i)]) == b"session %d" % i
            assert s.count("READ") >= 1 and s.count("WRITE") >= 1
        # All sessions share the loop's receive buffers instead of owning one each.
        assert pool_for(asyncio.get_running_loop(), BUFFER_SIZE).allocated <= 4
        assert len(fuse_mount.exportd_mounts()) >= n
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    assert all(fs.ended == "closed" for fs in filesystems)


async def test_interrupt_cancels_a_handler_that_never_finishes(target):
    fs = MemoryFS(65536, direct_io=True)  # direct I/O: the read waits interruptibly
    fs.data[:] = pattern(65536)
    async with serving(fs, target) as session:
        fs.hang_reads = True
        from tests.support.fuse import INTERRUPTED_READ, PRELUDE

        proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + INTERRUPTED_READ, target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            await asyncio.wait_for(fs.hung.wait(), 20)
            assert session.in_flight == 1
            os.kill(proc.pid, signal.SIGUSR1)
            stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert json.loads(stdout.strip().splitlines()[-1]) == [-1, errno.EINTR], stderr
        assert session.count("INTERRUPT") == 1
        assert session.in_flight == 0
        # The session keeps working.
        fs.hang_reads = False
        assert (
            await child("out(open(sys.argv[1], 'rb').read(10).hex())", target) == pattern(10).hex()
        )
        assert not session.closed.done()


async def test_passthrough_serves_reads_without_the_daemon(workdir, target):
    backing = workdir / "backing.raw"
    content = os.urandom(4 * 1024 * 1024 + 4096)
    backing.write_bytes(content)
    fs = FileFS(str(backing))
    try:
        async with serving(fs, target, passthrough=True) as session:
            assert session.passthrough_available, "6.18 offers FUSE_PASSTHROUGH"
            fs.backing_id = session.open_backing(fs.fd)
            assert fs.backing_id > 0
            res = await child(
                """
                import hashlib
                p = sys.argv[1]
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                m = mmap.mmap(-1, 1 << 20)
                n = os.preadv(fd, [m], 1 << 20)
                os.close(fd)
                with open(p, "r+b") as f:  # writes go to the backing file too
                    f.seek(4096); f.write(b"written by the kernel"); f.flush(); os.fsync(f.fileno())
                out([h, n, hashlib.sha256(m).hexdigest()])
                """,
                target,
            )
            assert res[0] == hashlib.sha256(content).hexdigest()
            assert res[1:] == [1 << 20, hashlib.sha256(content[1 << 20 : 2 << 20]).hexdigest()]
            assert session.count("OPEN") >= 2
            assert session.count("READ") == 0, session.counters
            assert session.count("WRITE") == 0, session.counters
            assert backing.read_bytes()[4096 : 4096 + 21] == b"written by the kernel"
            session.close_backing(fs.backing_id)
    finally:
        fs.close()


async def test_passthrough_refusal_is_reported(target):
    async with serving(MemoryFS(4096), target) as session:
        assert not session.passthrough_available
        with pytest.raises(PassthroughUnavailable):
            session.open_backing(0)


async def test_unmount_from_outside_ends_the_session(target):
    fs = MemoryFS(4096)
    session = await FuseSession.start(fs, target, fsname="exportd:outside")
    try:
        assert await child("out(os.stat(sys.argv[1]).st_size)", target) == 4096
        await command("umount", "-l", target)
        assert await asyncio.wait_for(session.closed, 10) == "unmounted"
        assert fs.ended == "unmounted"
    finally:
        await session.close()  # idempotent after the end
    assert not fuse_mount.exportd_mounts(target)


async def test_close_is_idempotent_and_concurrent(target):
    fs = MemoryFS(4096)
    session = await FuseSession.start(fs, target, fsname="exportd:twice")
    await asyncio.gather(session.close(), session.close())
    await session.close()
    assert session.closed.result() == "closed" and fs.ended == "closed"
    assert not fuse_mount.exportd_mounts(target)


async def test_mount_errors_are_clear(workdir):
    with pytest.raises(MountError, match="not a regular file"):
        await FuseSession.start(MemoryFS(1), str(workdir), fsname="exportd:dir")
    with pytest.raises(MountError, match="No such file"):
        await FuseSession.start(MemoryFS(1), str(workdir / "missing"), fsname="exportd:missing")


def test_killed_daemon_leaves_a_stale_mount_that_is_found_and_cleaned(target):
    proc = start_toy(target, "--fill", "--size", "65536", "--fsname", "exportd:crashy", "--uvloop")
    try:
        with open(target, "rb") as f:  # served by the other process: fine here
            assert f.read(4) == bytes(range(4))  # toy --fill pattern
        proc.kill()
        proc.wait(timeout=10)
        # The mount stays, dead: stat gives ENOTCONN rather than hanging.
        assert fuse_mount.probe(target) == "dead"
        stale = fuse_mount.find_stale_mounts([target])
        assert [m.source for m in stale] == ["exportd:crashy"]
        assert fuse_mount.clean_stale_mounts([target]) == [os.path.abspath(target)]
        assert not fuse_mount.exportd_mounts(target)
        assert os.stat(target).st_size == 0  # the file underneath is back
        # ... and a new daemon can mount there again.
        proc = start_toy(target, "--fill", "--size", "4096", "--fsname", "exportd:again")
        with open(target, "rb") as f:
            assert f.read(3) == bytes(range(3))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
    assert not fuse_mount.exportd_mounts(target)


def test_reader_blocked_in_a_killed_daemon_gets_an_error(target):
    proc = start_toy(target, "--direct-io", "--hang-reads", "--fsname", "exportd:stuck")
    reader = None
    try:
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 10, 0)",
                target,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            reader.wait(timeout=0.5)  # stuck in the never-finishing handler
        proc.kill()
        proc.wait(timeout=10)
        _, err = reader.communicate(timeout=20)  # no hang: the request fails
        assert reader.returncode != 0
        assert (
            "Transport endpoint is not connected" in err
            or "Software caused connection abort" in err
        ), err
    finally:
        for p in (reader, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        fuse_mount.clean_stale_mounts([target])
    assert not fuse_mount.exportd_mounts(target)


async def test_close_with_the_file_still_open_detaches_without_hanging(target):
    fs = MemoryFS(4096, direct_io=True)  # no page cache: reads must reach the daemon
    fs.data[:5] = b"hello"
    session = await FuseSession.start(fs, target, fsname="exportd:busy")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(os.pread(fd, 5, 0).decode(), flush=True)
sys.stdin.readline()             # hold the file open until told
try:
    os.pread(fd, 5, 0); print("read ok")
except OSError as e:
    print("error", e.errno)
""",
            target,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "hello"
        await asyncio.wait_for(session.close(), 20)  # EBUSY -> lazy detach, connection closed
        assert not fuse_mount.exportd_mounts(target)
        out, _ = await asyncio.to_thread(holder.communicate, "go\n", 20)
        assert out.startswith("error"), out
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        await session.close()


def test_live_mounts_are_not_taken_for_stale(target):
    proc = start_toy(target, "--size", "4096", "--fsname", "exportd:alive")
    try:
        assert fuse_mount.find_stale_mounts([target]) == []
        assert fuse_mount.clean_stale_mounts([target]) == []
        assert len(fuse_mount.exportd_mounts(target)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "ended closed" in out
    assert not fuse_mount.exportd_mounts(target)


async def test_mountpoint_reached_through_a_symlink(workdir):
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to(workdir / "real")
    (workdir / "real" / "f.img").write_bytes(b"")
    fs = MemoryFS(10)
    async with serving(fs, str(workdir / "link" / "f.img")) as session:
        assert session.mountpoint == str(workdir / "real" / "f.img")
        assert session.connection is not None
        assert (
            await child("out(os.stat(sys.argv[1]).st_size)", str(workdir / "link" / "f.img")) == 10
        )
    assert not fuse_mount.exportd_mounts(str(workdir / "real" / "f.img"))


def test_serves_on_uvloop(target):
    uvloop = pytest.importorskip("uvloop")

    class Slow(MemoryFS):
        async def read(self, fh, offset, size):
            await asyncio.sleep(0.001)  # suspends: the request continues as a task
            return await super().read(fh, offset, size)

    async def scenario():
        fs = Slow(1 << 20, direct_io=True)
        fs.data[:] = pattern(1 << 20)
        async with serving(fs, target) as session:
            got = await child(
                """
                fd = os.open(sys.argv[1], os.O_RDWR)
                os.pwrite(fd, b"uv", 10)
                out(os.pread(fd, 1 << 20, 0).hex())
                """,
                target,
            )
            assert session.count("READ") >= 1 and session.in_flight == 0
        return bytes.fromhex(got), fs

    data, fs = uvloop.run(scenario())
    want = bytearray(pattern(1 << 20))
    want[10:12] = b"uv"
    assert data == bytes(want) and fs.ended == "closed"


async def test_cancelled_start_leaves_no_mount(target):
    for yields in range(1, 15, 2):  # cancel at different points of mount + INIT
        task = asyncio.ensure_future(
            FuseSession.start(MemoryFS(10), target, fsname="exportd:cancel")
        )
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        try:
            session = await task
        except asyncio.CancelledError:
            pass
        else:
            await session.close()
        assert not fuse_mount.exportd_mounts(target), yields


async def test_mount_options_read_only_and_allow_other(public_target):
    target = public_target
    fs = MemoryFS(4096)
    fs.mode = 0o644
    async with serving(fs, target, read_only=True, allow_other=True) as session:
        (m,) = fuse_mount.exportd_mounts(target)
        opts = m.options.split(",")
        for opt in (
            "ro",
            "nosuid",
            "nodev",
            "noatime",
            "default_permissions",
            "allow_other",
            "max_read=1048576",
        ):
            assert opt in opts, (opt, m.options)
        res = await child(
            """
            r = []
            try:
                os.open(sys.argv[1], os.O_WRONLY)
            except OSError as e:
                r.append(e.errno)
            os.setgid(65534); os.setuid(65534)      # another user: allowed by allow_other
            r.append(len(open(sys.argv[1], "rb").read()))
            out(r)
            """,
            target,
        )
        assert res == [errno.EROFS, 4096]
        assert session.count("WRITE") == 0


async def test_without_allow_other_other_users_are_refused(public_target):
    target = public_target
    async with serving(MemoryFS(4096), target):
        res = await child(
            """
            os.setgid(65534); os.setuid(65534)
            try:
                os.stat(sys.argv[1]); out(0)
            except OSError as e:
                out(e.errno)
            """,
            target,
        )
        assert res == errno.EACCES


async def test_passthrough_with_a_backing_file_on_overlayfs(workdir, target):
    for sub in ("lower", "upper", "work", "merged"):
        (workdir / sub).mkdir()
    content = os.urandom(300_000)
    (workdir / "lower" / "disk.raw").write_bytes(content)
    merged = workdir / "merged"
    await command(
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={workdir}/lower,upperdir={workdir}/upper,workdir={workdir}/work",
        str(merged),
    )
    try:
        fs = FileFS(str(merged / "disk.raw"), read_only=True)
        try:
            async with serving(fs, target, passthrough=True, read_only=True) as session:
                fs.backing_id = session.open_backing(fs.fd)  # stacked backing: depth 1 < 2
                got = await child(
                    "import hashlib; out(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
                    target,
                )
                assert got == hashlib.sha256(content).hexdigest()
                assert session.count("READ") == 0
        finally:
            fs.close()
    finally:
        await command("umount", str(merged))
