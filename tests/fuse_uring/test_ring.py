"""FUSE over io_uring: negotiation, fallback, `on` refusals, INTERRUPT, and
ends (close, unmount from outside, a client killed mid-request) while the
ring is active."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from exportd.fuse import abi, uring
from exportd.fuse.session import FuseSession, IoUringUnavailable
from tests.support.daemon import Exportd
from tests.support.fuse import INTERRUPTED_READ, PRELUDE, child, pattern, serving
from tests.support.mounts import exportd_mounts_under
from tests.support.toyfs import MemoryFS

SIZE = 4 * 1024 * 1024

ROUND_TRIP = """
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
buf[:] = pattern(1 << 20, 5)
assert os.pwritev(fd, [buf], 1 << 20) == 1 << 20          # a 1 MiB WRITE: a full payload
small = mmap.mmap(-1, 4096); small[:] = pattern(4096, 9)
assert os.pwritev(fd, [small], 8192) == 4096
got = mmap.mmap(-1, 1 << 20)
assert os.preadv(fd, [got], 1 << 20) == 1 << 20           # a 1 MiB READ
one = mmap.mmap(-1, 4096)
assert os.preadv(fd, [one], 8192) == 4096
os.fsync(fd)
out([got[:] == pattern(1 << 20, 5), one[:] == pattern(4096, 9), os.fstat(fd).st_size])
"""


def filled(**kw) -> MemoryFS:
    fs = MemoryFS(SIZE, **kw)
    fs.data[:] = pattern(SIZE)
    fs.allocated.update(range(SIZE // 4096))
    return fs


async def test_ring_is_negotiated_and_serves_every_request(target, need_ring):
    fs = filled(direct_io=True)
    async with serving(fs, target, io_uring="on") as session:
        assert session.io_uring and session.io_uring_reason == ""
        ring = session.channel.ring
        assert ring is not None
        assert ring.queues == uring.possible_cpus()
        assert len(ring.entries) == ring.queues * uring.depth_from_env()
        assert await child(ROUND_TRIP, target) == [True, True, SIZE]
        # everything after INIT came through the ring, none through /dev/fuse
        counted = sum(n for op, n in session.counters.items() if op != "INIT")
        assert session.ring_served == counted > 0
        assert session.count("WRITE") >= 2 and session.count("READ") >= 2
    assert bytes(fs.data[1 << 20 : 2 << 20]) == pattern(1 << 20, 5)
    assert fs.ended == "closed"


async def test_off_stays_on_dev_fuse(target, need_ring):
    fs = filled()
    async with serving(fs, target, io_uring="off") as session:
        assert not session.io_uring and session.channel.ring is None
        assert await child(ROUND_TRIP, target) == [True, True, SIZE]
        assert session.ring_served == 0


async def test_auto_falls_back_when_the_parameter_is_off(target, parameter_off):
    fs = filled()
    async with serving(fs, target, io_uring="auto") as session:
        assert not session.io_uring
        assert "enable_uring is N" in session.io_uring_reason
        assert await child(ROUND_TRIP, target) == [True, True, SIZE]
        assert session.ring_served == 0


async def test_on_fails_with_the_reason_and_leaves_nothing_mounted(workdir, target, parameter_off):
    with pytest.raises(IoUringUnavailable) as info:
        await FuseSession.start(MemoryFS(4096), target, fsname="exportd:t", io_uring="on")
    assert "enable_uring is N" in str(info.value)
    assert "echo Y > /sys/module/fuse/parameters/enable_uring" in str(info.value)
    assert not exportd_mounts_under(str(workdir))


async def test_kernel_not_offering_the_ring_fails_on_after_init(workdir, target, need_ring, monkeypatch):
    """The parameter read Y but INIT did not offer FUSE_OVER_IO_URING (it was
    turned off in between): `on` still fails with the reason, after INIT."""
    if os.geteuid() != 0:
        pytest.skip("turning the module parameter off needs root")
    monkeypatch.setattr("exportd.fuse.session.unavailable_reason", lambda: "")
    with open(uring.ENABLE_PARAMETER, "w") as f:
        f.write("N")
    try:
        with pytest.raises(IoUringUnavailable) as info:
            await FuseSession.start(MemoryFS(4096), target, fsname="exportd:t", io_uring="on")
    finally:
        with open(uring.ENABLE_PARAMETER, "w") as f:
            f.write("Y")
    assert "did not offer FUSE_OVER_IO_URING" in str(info.value)
    assert not exportd_mounts_under(str(workdir))


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def test_interrupt_reaches_a_ring_request(target, need_ring):
    """INTERRUPT still comes over /dev/fuse; its target came through the ring."""
    fs = filled(direct_io=True)
    async with serving(fs, target, io_uring="on") as session:
        fs.hang_reads = True
        proc = _spawn(INTERRUPTED_READ, target)
        try:
            await asyncio.wait_for(fs.hung.wait(), 20)
            assert session.in_flight == 1
            assert session.channel.ring.by_unique  # the READ waits in a ring entry
            os.kill(proc.pid, signal.SIGUSR1)
            stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert json.loads(stdout.strip().splitlines()[-1]) == [-1, errno.EINTR], stderr
        assert session.count("INTERRUPT") == 1
        assert session.in_flight == 0 and not session.channel.ring.by_unique
        fs.hang_reads = False
        assert await child("out(open(sys.argv[1], 'rb').read(10).hex())", target) == pattern(10).hex()


async def test_client_killed_mid_request(target, need_ring):
    """A reader killed while its READ waits in the daemon: the kernel
    interrupts it, the entry is answered and reused, the next client is served."""
    fs = filled(direct_io=True)
    async with serving(fs, target, io_uring="on") as session:
        fs.hang_reads = True
        proc = _spawn("fd = os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 4096, 0)", target)
        try:
            await asyncio.wait_for(fs.hung.wait(), 20)
            proc.kill()
            assert await asyncio.to_thread(proc.wait, 20) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for _ in range(200):
            if session.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert session.in_flight == 0 and not session.channel.ring.by_unique
        fs.hang_reads = False
        res = await child(
            "fd = os.open(sys.argv[1], os.O_RDONLY); out(os.pread(fd, 64, 4096).hex())", target
        )
        assert res == pattern(SIZE)[4096 : 4096 + 64].hex()
        assert not session.closed.done()


async def test_close_with_a_request_in_a_ring_entry(workdir, target, need_ring):
    fs = filled(direct_io=True)
    session = await FuseSession.start(fs, target, fsname="exportd:t", io_uring="on")
    try:
        fs.hang_reads = True
        reader = asyncio.create_task(
            child("fd = os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 10, 0)",
                  target, check=False, timeout=30)
        )
        await asyncio.wait_for(fs.hung.wait(), 20)
    finally:
        await asyncio.wait_for(session.close(), 20)
    proc = await reader
    assert proc.returncode != 0  # its request ended with an error
    assert fs.ended == "closed"
    assert session.channel.fd == -1 and session.channel.ring.fd == -1
    assert not exportd_mounts_under(str(workdir))


async def test_unmounted_from_outside_with_the_ring_active(workdir, target, need_ring):
    if os.geteuid() != 0:
        pytest.skip("umount(8) of our mount needs root here")
    fs = filled()
    session = await FuseSession.start(fs, target, fsname="exportd:t", io_uring="on")
    try:
        assert await child("out(len(open(sys.argv[1], 'rb').read(8192)))", target) == 8192
        await asyncio.to_thread(subprocess.run, ["umount", target], check=True)
        assert await asyncio.wait_for(session.closed, 20) == "unmounted"
    finally:
        await session.close()
    assert fs.ended == "unmounted"


async def test_export_option_and_query(workdir, need_ring):
    """io-uring on the QMP export: shown in query-block-exports; `on`
    with the parameter off fails with the reason and mounts nothing."""
    img = workdir / "d.raw"
    img.write_bytes(pattern(1 << 20))
    for name in ("m1.raw", "m2.raw", "m3.raw"):
        (workdir / name).touch()
    d = Exportd(workdir)
    await d.start()
    try:
        await d.blockdev_file("f", img)
        await d.add_export("e1", "f", workdir / "m1.raw", io_uring="on")
        await d.add_export("e2", "f", workdir / "m2.raw", io_uring="off")
        shown = {e["id"]: e["io-uring"] for e in await d.exports()}
        assert shown == {"e1": True, "e2": False}
        assert (workdir / "m1.raw").read_bytes()[:4096] == pattern(4096)
        # deleted with the ring active (hard: a reader may still hold it open)
        await d.del_export("e1", "hard")
        assert [e["id"] for e in await d.exports()] == ["e2"]
        await d.add_export("e1", "f", workdir / "m1.raw", io_uring="on")  # the id and mountpoint again
        assert (workdir / "m1.raw").read_bytes()[:4096] == pattern(4096)
        text = await d.error("block-export-add", {
            "type": "fuse", "id": "e3", "node-name": "f",
            "mountpoint": str(workdir / "m3.raw"), "io-uring": "sometimes"})
        assert text == "Parameter 'io-uring' does not accept value 'sometimes'"
        if os.geteuid() == 0:
            with open(uring.ENABLE_PARAMETER, "w") as f:
                f.write("N")
            try:
                text = await d.error("block-export-add", {
                    "type": "fuse", "id": "e3", "node-name": "f",
                    "mountpoint": str(workdir / "m3.raw"), "io-uring": "on"})
                await d.add_export("e4", "f", workdir / "m3.raw", io_uring="auto")
            finally:
                with open(uring.ENABLE_PARAMETER, "w") as f:
                    f.write("Y")
            assert text.startswith("Cannot use io_uring for export 'e3': FUSE over io_uring is disabled")
            assert {e["id"]: e["io-uring"] for e in await d.exports()}["e4"] is False
        await d.quit()
    finally:
        await d.stop()
    assert not exportd_mounts_under(str(workdir))


async def test_command_line_export_with_io_uring_on(workdir, need_ring):
    """The syntax the benchmark's exportd peer uses: --export ...,io-uring=on."""
    img = workdir / "d.raw"
    img.write_bytes(pattern(1 << 20))
    (workdir / "m.raw").touch()
    d = Exportd(workdir)
    await d.start(
        "--blockdev", f"driver=file,node-name=f,filename={img}",
        "--export", f"type=fuse,id=e,node-name=f,mountpoint={workdir / 'm.raw'},writable=on,io-uring=on",
    )
    try:
        [shown] = await d.exports()
        assert shown["io-uring"] is True and shown["writable"] is True
        fd = await asyncio.to_thread(os.open, workdir / "m.raw", os.O_RDWR)
        try:
            await asyncio.to_thread(os.pwrite, fd, b"ring", 4096)
            assert await asyncio.to_thread(os.pread, fd, 8, 4094) == pattern(4096)[4094:] + b"ring" + pattern(8192)[4100:4102]
        finally:
            os.close(fd)
        await d.quit()
    finally:
        await d.stop()
    assert img.read_bytes()[4096:4100] == b"ring"
    assert not exportd_mounts_under(str(workdir))


def test_init_flag_is_bit_41():
    assert abi.OVER_IO_URING == 1 << 41
