"""Crash safety of block jobs (issue 12): kill -9 of the daemon while a job
copies leaves every image consistent (qemu-img check clean) and the data
the guest sees through the active layer unchanged, writes acknowledged
(fsync'ed) through the FUSE export included; a new daemon on the same
images can then run the same job to its end.

Each case builds base <- mid <- top (qcow2, distinct patterns per layer,
a zeroed range in top), exports top, starts one kind of job rate-limited,
writes through the export (a few known writes mid-copy, or a writer that
keeps going after READY), kills the daemon, and checks with qemu-img only:
the model is what qemu-img read from the chain before the daemon opened
it, plus the acknowledged writes. A leaked cluster (qemu-img check's exit
3) passes only when a guest write was in flight at the kill, as QEMU's
qcow2 can leave one too; corruption never passes. Then a new daemon
exports the same file on the dead mountpoint, runs the same job again to
its end (job-complete once READY), and everything is checked again."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Exportd
from tests.support.mounts import fuse_mounts_under, lazy_unmount_all
from tests.support.threads import athread

K, M = 1 << 10, 1 << 20
SIZE = 6 * M
SPEED = 1 * M  # bytes/s: the copy of a few MiB takes seconds, so the kill lands mid-copy
SECTOR = 512


# --- images ----------------------------------------------------------------------------------
def qemu_io(img: Path, *cmds: str) -> None:
    for c in cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, str(img)], check=True, capture_output=True)


def create(img: Path, backing: Path | None = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(img), str(SIZE)], check=True)


def make_chain(d: Path) -> None:
    create(d / "base.qcow2")
    qemu_io(d / "base.qcow2", "write -P 0x11 0 6M")
    create(d / "mid.qcow2", d / "base.qcow2")
    qemu_io(d / "mid.qcow2", "write -P 0x22 1M 3M")
    create(d / "top.qcow2", d / "mid.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x33 2M 512K", "write -P 0x44 4M 1M", "write -z 5M 256K")


def raw(img: Path) -> bytes:
    out = img.with_suffix(".raw-view")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def assert_clean(*images: Path, leaks_allowed: bool = False) -> None:
    """qemu-img check finds nothing. With leaks_allowed (a guest write was in
    flight at the kill: its fsync writes refcounts before the L2 entries that
    use them, as QEMU does, so a crash between the two leaks a cluster, which
    is harmless to data),
    leaks pass and are repaired as an admin would (check -r leaks); any
    corruption fails."""
    for img in images:
        if not img.exists():
            continue
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        if r.returncode == 3 and leaks_allowed and "corrupt" not in r.stdout + r.stderr:
            r = subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, (img.name, r.returncode, r.stdout, r.stderr)


def backing_of(img: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                     capture_output=True, text=True, check=True).stdout)
    return info.get("backing-filename")


# --- the guest's writes ------------------------------------------------------------------------
class Model:
    """What the guest must read: the chain's data, the acknowledged writes,
    and at most one write in flight at the kill (old or new data, per sector)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.pending: tuple[int, bytes] | None = None

    def acked(self, off: int, data: bytes) -> None:
        self.data[off:off + len(data)] = data

    def check(self, got: bytes, what: str) -> None:
        assert len(got) == len(self.data), what
        if self.pending is None:
            assert got == self.data, f"{what}: first difference at {first_diff(got, self.data)}"
            return
        off, new = self.pending
        end = off + len(new)
        assert got[:off] == self.data[:off] and got[end:] == self.data[end:], \
            f"{what}: first difference at {first_diff(got, self.data)}"
        for s in range(off, end, SECTOR):
            sector = got[s:s + SECTOR]
            assert sector in (self.data[s:s + SECTOR], new[s - off:s - off + SECTOR]), f"{what}: torn at {s}"


def first_diff(a: bytes, b: bytes | bytearray) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def block(n: int) -> bytes:
    """4 KiB nobody else writes: the write's number, repeated."""
    return struct.pack("<Q", n) * (4096 // 8)


def write_fsync(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Writes 4 KiB blocks at random offsets, each fsync'ed, until stopped
    or until the export dies; records what was acknowledged (in a thread)."""

    def __init__(self, path: Path, model: Model, seed: int) -> None:
        self.path, self.model = path, model
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.count = 0
        self.error: OSError | None = None

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            n = 1
            while not self.stop.is_set():
                off = self.rng.randrange(SIZE // 4096) * 4096
                data = block(n)
                self.model.pending = (off, data)
                os.pwrite(fd, data, off)
                os.fsync(fd)
                self.model.pending = None
                self.model.acked(off, data)
                self.count = n
                n += 1
        except OSError as e:
            self.error = e  # the daemon is gone: ENOTCONN
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


# --- the jobs --------------------------------------------------------------------------------
# cmd, args (without job-id and speed), ready: the job reaches READY and needs job-complete,
# lands: the image that is the active layer after the job, target: the mirror's target image
CASES: dict[str, dict[str, Any]] = {
    "stream": {"cmd": "block-stream", "args": {"device": "top"}, "lands": "top"},
    "commit-intermediate": {"cmd": "block-commit", "lands": "top",
                            "args": {"device": "top", "top-node": "mid", "base-node": "base"}},
    "commit-active": {"cmd": "block-commit", "args": {"device": "top"}, "ready": True, "lands": "base"},
    "commit-active-after-ready": {"cmd": "block-commit", "args": {"device": "top"}, "ready": True,
                                  "lands": "base", "kill_when_ready": True},
    "mirror-full": {"cmd": "blockdev-mirror", "args": {"device": "top", "target": "dst", "sync": "full"},
                    "ready": True, "lands": "dst", "target": "full"},
    "mirror-full-after-ready": {"cmd": "blockdev-mirror", "ready": True, "lands": "dst", "target": "full",
                                "args": {"device": "top", "target": "dst", "sync": "full"},
                                "kill_when_ready": True},
    "mirror-write-blocking-after-ready": {"cmd": "blockdev-mirror", "ready": True, "lands": "dst",
                                          "target": "full", "kill_when_ready": True,
                                          "args": {"device": "top", "target": "dst", "sync": "full",
                                                   "copy-mode": "write-blocking"}},
    "mirror-top": {"cmd": "blockdev-mirror", "args": {"device": "top", "target": "dst", "sync": "top"},
                   "ready": True, "lands": "dst", "target": "top"},
    "mirror-top-after-ready": {"cmd": "blockdev-mirror", "ready": True, "lands": "dst", "target": "top",
                               "args": {"device": "top", "target": "dst", "sync": "top"},
                               "kill_when_ready": True},
    "drive-mirror": {"cmd": "drive-mirror", "ready": True, "lands": "dst",
                     "args": {"device": "top", "target": "{dst}", "format": "qcow2", "sync": "full",
                              "node-name": "dst"}},
    # sync=none copies only what is written during the job: READY at once,
    # killed while the writer goes on; the new image's backing is the source
    "drive-mirror-none-after-ready": {"cmd": "drive-mirror", "ready": True, "lands": "dst", "kill_when_ready": True,
                                      "args": {"device": "top", "target": "{dst}", "format": "qcow2",
                                               "sync": "none", "node-name": "dst"}},
}


def job_args(c: dict[str, Any], d: Path) -> dict[str, Any]:
    return {k: (v.format(dst=d / "dst.qcow2") if isinstance(v, str) else v) for k, v in c["args"].items()}


async def open_images(q: Exportd, d: Path, c: dict[str, Any]) -> None:
    def qcow2(name: str, backing: str | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": "qcow2", "node-name": name, "read-only": False,
                                "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")}}
        if backing is not None:
            opts["backing"] = backing
        return opts

    await q.cmd("blockdev-add", qcow2("base"))
    await q.cmd("blockdev-add", qcow2("mid", "base"))
    await q.cmd("blockdev-add", qcow2("top", "mid"))
    if c.get("target") == "full":
        await q.cmd("blockdev-add", {**qcow2("dst"), "backing": None})
    elif c.get("target") == "top":
        await q.cmd("blockdev-add", qcow2("dst", "mid"))


async def job_info(q: Exportd) -> dict[str, Any]:
    jobs = await q.cmd("query-block-jobs")
    assert [j["device"] for j in jobs] == ["j"], jobs
    return jobs[0]


async def until_progress(q: Exportd, at_least: int) -> dict[str, Any]:
    for _ in range(300):
        info = await job_info(q)
        if info["offset"] >= at_least:
            return info
        await asyncio.sleep(0.02)
    raise AssertionError(f"no progress: {info}")


async def run_to_end(q: Exportd, c: dict[str, Any]) -> None:
    if c.get("ready"):
        await q.event("BLOCK_JOB_READY", timeout=30)
        await q.cmd("job-complete", {"id": "j"})
    done = await q.event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done, done


@pytest.mark.parametrize("case", list(CASES))
async def test_kill9_during_a_job(exportd: Exportd, workdir: Path, case: str) -> None:
    c, d = CASES[case], workdir
    make_chain(d)
    if c.get("target") == "full":
        create(d / "dst.qcow2")
    elif c.get("target") == "top":
        create(d / "dst.qcow2", d / "mid.qcow2")
    model = Model(raw(d / "top.qcow2"))  # qemu's reading of the chain, before exportd opened it
    images = [d / f"{n}.qcow2" for n in ("base", "mid", "top", "dst")]

    # 1. the job under a live export, then kill -9 mid-copy
    q = exportd
    await open_images(q, d, c)
    mnt = d / "disk.raw"
    mnt.touch()
    await q.add_export("e", "top", mnt, writable=True)
    await q.cmd(c["cmd"], {"job-id": "j", "speed": SPEED, **job_args(c, d)})
    writer: Writer | None = None
    if c.get("kill_when_ready"):
        await q.cmd("block-job-set-speed", {"device": "j", "speed": 0})
        await q.event("BLOCK_JOB_READY", timeout=30)
        writer = Writer(mnt, model, seed=len(case))
        writing = asyncio.ensure_future(athread(writer.run))
        for _ in range(1500):  # 30 s
            if writer.count >= 40 or writing.done():
                break
            await asyncio.sleep(0.02)
        assert writer.count >= 40 and writer.error is None and not writing.done(), writer.error
        info = await job_info(q)
        assert info["ready"] and info["status"] == "ready", info
    else:
        total = (await until_progress(q, 1))["len"]
        # one write before the copy's cursor, one (most likely) after it
        for off, n in ((64 * K, 1), (SIZE - 64 * K, 2)):
            await athread(write_fsync, mnt, off, block(n))
            model.acked(off, block(n))
        info = await until_progress(q, total // 4)
        assert info["status"] == "running" and not info["ready"] and info["offset"] < info["len"], info
    await q.disconnect()
    q.kill9()
    await q.stop()
    if writer is not None:
        writer.stop.set()
        await writing
        assert writer.error is not None or writer.count >= 40
    assert fuse_mounts_under(str(d)) == [str(mnt)]  # dead: the next export on it cleans it

    # 2. what the crash left: clean images, the guest's data in the active layer
    assert_clean(*images, leaks_allowed=model.pending is not None)
    model.check(raw(d / "top.qcow2"), "after the kill")
    model.pending = None
    model.data[:] = raw(d / "top.qcow2")  # the write in flight settled one way or the other

    # 3. a fresh daemon exports the same file on the same (dead) mountpoint
    # and runs the same job to its end; the export ends on the job's result
    again = Exportd(d)
    await again.start()
    try:
        await open_images(again, d, c)
        await again.add_export("e", "top", mnt, writable=True)
        model.check(await athread(mnt.read_bytes), "through the new export")
        await again.cmd(c["cmd"], {"job-id": "j", **job_args(c, d)})
        await run_to_end(again, c)
        assert [e["node-name"] for e in await again.exports()] == [c["lands"]]
        model.check(await athread(mnt.read_bytes), "through the export after the job")
        await again.del_export("e")
        await again.quit()
        assert fuse_mounts_under(str(d)) == []  # the dead mount went with the new export
    finally:
        await again.stop()
        lazy_unmount_all(str(d))
    assert_clean(*images)
    lands = d / f"{c['lands']}.qcow2"
    model.check(raw(lands), "after the restarted job")
    model.check(raw(d / "top.qcow2"), "the old active layer")  # nothing was written after the pivot
    if c["cmd"] == "block-stream":
        assert backing_of(lands) is None
    elif case == "commit-intermediate":
        assert backing_of(lands) == str(d / "base.qcow2")
    elif c["args"].get("sync") == "none":
        assert backing_of(lands) == str(d / "top.qcow2")
    if c["lands"] == "dst":
        r = subprocess.run(["qemu-img", "compare", "-q", str(d / "top.qcow2"), str(lands)], capture_output=True)
        assert r.returncode == 0, r
