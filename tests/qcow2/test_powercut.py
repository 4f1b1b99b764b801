"""Power-cut simulation: the qcow2 node runs on a device that keeps what was
flushed and forgets an arbitrary subset of the 512-byte sectors written since
the last flush when the power is cut (kill -9 cannot show this: the page cache
survives it). The cut happens at every kind of moment, also in the middle of a
metadata write-back. The resulting image file must pass `qemu-img check`
without errors, and everything acknowledged by a completed flush must read back.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exportd.block import DRIVERS
from exportd.block.graph import BlockGraph
from exportd.block.node import BlockNode
from tests.support.qcow2 import MiB, run, to_raw

SECTOR = 512
TRIALS = int(os.environ.get("QCOW2_POWERCUT_TRIALS", "16"))  # more for a soak run
CUTS_PER_SEQUENCE = 4  # power cuts at different moments of one operation sequence


class PowerCut(Exception):
    pass


class PowerCutDevice(BlockNode):
    """A block device in memory with a volatile write cache (test fault injector)."""

    driver = "x-powercut-test"
    option_members = frozenset({"filename"})  # the driver table: its blockdev-add members

    def __init__(self, node_name: str, data: bytes, path: str) -> None:
        super().__init__(node_name, read_only=False)
        self.durable = bytearray(data)
        self.pending: list[tuple[int, bytes]] = []
        self.path = path
        self.cut_after: int | None = None  # device calls until the power goes
        self.calls = 0
        self.dead = False
        self.flush_calls: list[int] = []  # call numbers of the flushes (fsyncs)

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> BlockNode:
        path = options["filename"]
        return cls(node_name, Path(path).read_bytes(), path)

    def _tick(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "device lost power")
        self.calls += 1
        if self.cut_after is not None and self.calls >= self.cut_after:
            self.dead = True
            raise PowerCut()

    def current(self) -> bytearray:
        img = bytearray(self.durable)
        for off, data in self.pending:
            if off + len(data) > len(img):
                img.extend(bytes(off + len(data) - len(img)))
            img[off : off + len(data)] = data
        return img

    async def read(self, offset: int, length: int) -> bytes:
        if self.dead:
            raise OSError(errno.EIO, "device lost power")
        img = self.current()
        return bytes(img[offset : offset + length]).ljust(length, b"\0")

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        self._tick()
        self.pending.append((offset, bytes(data)))

    async def flush(self) -> None:
        self._tick()
        self.flush_calls.append(self.calls)
        self.durable = self.current()
        self.pending = []

    def getlength(self) -> int:
        return len(self.current()) if self.pending else len(self.durable)

    def filename(self) -> str:
        return self.path

    def after_power_cut(self, rng: random.Random) -> bytes:
        """The disk contents after the cut: durable data plus any subset of the
        sectors written since the last flush (in write order)."""
        img = bytearray(self.durable)
        for off, data in self.pending:
            for s in range(0, len(data), SECTOR):
                if rng.random() < 0.5:
                    piece = data[s : s + SECTOR]
                    end = off + s + len(piece)
                    if end > len(img):
                        img.extend(bytes(end - len(img)))
                    img[off + s : end] = piece
        return bytes(img)


def _ops(rng: random.Random, size: int, n: int) -> list[tuple[str, int, int, bytes]]:
    out = []
    for _ in range(n):
        off = rng.randrange(0, size)
        ln = min(rng.choice([300, 4096, 9000, 70000, 200000]), size - off)
        r = rng.random()
        if r < 0.7:
            out.append(("write", off, ln, rng.randbytes(ln)))
        elif r < 0.85:
            out.append(("zero", off, ln, b""))
        elif r < 0.95:
            out.append(("discard", off, ln, b""))
        else:
            out.append(("flush", 0, 0, b""))
    return out


SETUPS = [
    ("cluster_size=4096", None),
    ("cluster_size=512,refcount_bits=64", None),  # refcount blocks + table growth
    ("cluster_size=8192", "backing"),
    ("cluster_size=16384", "snapshot"),
    ("cluster_size=1024,compat=0.10", None),
    ("cluster_size=4096,refcount_bits=1", None),
]


async def _count_calls(img: Path, pristine: bytes,
                       ops: list[tuple[str, int, int, bytes]]) -> tuple[int, list[int]]:
    img.write_bytes(pristine)
    g = BlockGraph(None)
    try:
        dev = await g.add({"driver": "x-powercut-test", "node-name": "dev", "filename": str(img)})
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": "dev", "discard": "unmap"})
        for kind, off, ln, data in ops:
            if kind == "write":
                await node.write(off, data)
            elif kind == "zero":
                await node.write_zeroes(off, ln, may_unmap=True)
            elif kind == "discard":
                await node.discard(off, ln)
            else:
                await node.flush()
        await node.flush()
        return dev.calls, dev.flush_calls
    finally:
        await g.close_all()


@pytest.fixture
def powercut_driver() -> Iterator[None]:
    """Make the test device openable by the graph for this test only."""
    DRIVERS[PowerCutDevice.driver] = PowerCutDevice
    try:
        yield
    finally:
        DRIVERS.pop(PowerCutDevice.driver, None)


@pytest.mark.parametrize("setup", range(len(SETUPS)))
async def test_power_cut_anywhere(tmp_path: Path, setup: int, powercut_driver: None) -> None:
    opts, extra = SETUPS[setup]
    size = 2 * MiB
    img = tmp_path / "pc.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if extra == "backing":
        base = tmp_path / "pcb.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size))
        run("qemu-io", "-c", "write -P 0x66 0 2M", str(base))
        args += ["-b", base.name, "-F", "qcow2"]
    run(*args, str(img), str(size))
    run("qemu-io", "-c", "write -P 0x31 256k 512k", str(img))
    if extra == "snapshot":
        run("qemu-img", "snapshot", "-c", "s", str(img))
    pristine = img.read_bytes()
    initial = to_raw(img, tmp_path / "initial.raw")
    cs = int(opts.split("cluster_size=")[1].split(",")[0])
    v2 = "compat=0.10" in opts

    for trial in range(TRIALS):
        rng = random.Random(setup * 1000 + trial)
        ops = _ops(random.Random(setup * 1000 + trial // CUTS_PER_SEQUENCE), size, 40)
        if trial % CUTS_PER_SEQUENCE == 0:
            # a run without a cut counts the device calls, so that the cuts below
            # fall anywhere in the real sequence (also inside metadata write-back)
            total, fsyncs = await _count_calls(img, pristine, ops)
        img.write_bytes(pristine)
        g = BlockGraph(None)
        dev = await g.add({"driver": "x-powercut-test", "node-name": "dev", "filename": str(img)})
        assert isinstance(dev, PowerCutDevice)
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": "dev", "discard": "unmap"})
        if trial % 2:
            dev.cut_after = rng.randrange(1, total + 2)
        else:  # right before an fsync: everything since the previous one is in the air
            dev.cut_after = max(1, rng.choice(fsyncs) - rng.randrange(0, 3))
        model = bytearray(initial)
        acked = bytearray(initial)
        touched_since_ack: list[tuple[int, int]] = []
        try:
            for kind, off, ln, data in ops:
                # an operation cut short may or may not have landed: mark it first
                if kind == "discard":
                    touched_since_ack.append((off - cs, off + ln + cs))
                elif kind != "flush":
                    touched_since_ack.append((off, off + ln))
                if kind == "write":
                    await node.write(off, data)
                    model[off : off + ln] = data
                elif kind == "zero":
                    await node.write_zeroes(off, ln, may_unmap=True)
                    model[off : off + ln] = bytes(ln)
                elif kind == "discard":
                    await node.discard(off, ln)
                    if not (v2 and extra == "backing"):
                        a, b = -(-off // cs) * cs, (off + ln) // cs * cs
                        if off + ln == size:
                            b = size
                        if b > a:
                            model[a:b] = bytes(b - a)
                else:
                    await node.flush()
                    acked = bytearray(model)
                    touched_since_ack = []
            await node.flush()
            acked = bytearray(model)
            touched_since_ack = []
        except PowerCut:
            pass
        crashed = dev.after_power_cut(rng)
        dev.dead = True
        await g.close_all()
        img.write_bytes(crashed)
        r = run("qemu-img", "check", "--output=json", str(img), check=False)
        assert r.returncode in (0, 3), f"setup {setup} trial {trial}: {r.stdout}{r.stderr}"
        got = to_raw(img, tmp_path / "got.raw")
        mask = bytearray(size)
        for lo, hi in touched_since_ack:
            lo, hi = max(0, lo), min(size, hi)
            mask[lo:hi] = b"\1" * (hi - lo)
        bad = [o for o in range(0, size, SECTOR)
               if not any(mask[o : o + SECTOR]) and got[o : o + SECTOR] != acked[o : o + SECTOR]]
        assert not bad, f"setup {setup} trial {trial}: flushed data lost at {bad[:4]}"
        if extra == "snapshot":
            snap = tmp_path / "snap.raw"
            run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=s", str(img), str(snap))
            assert snap.read_bytes() == initial


async def test_power_cut_during_resize(tmp_path: Path, powercut_driver: None) -> None:
    """Cut the power at every device call of a grow that moves the L1 table and
    grows the refcount table; then a shrink. Old data stays, check stays clean."""
    img = tmp_path / "rs.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
        str(img), str(MiB))
    run("qemu-io", "-c", "write -P 0x44 0 1M", str(img))
    pristine = img.read_bytes()

    async def attempt(cut: int | None, rng: random.Random) -> tuple[bool, int]:
        img.write_bytes(pristine)
        g = BlockGraph(None)
        dev = await g.add({"driver": "x-powercut-test", "node-name": "dev", "filename": str(img)})
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": "dev"})
        dev.cut_after = cut
        done = False
        try:
            await node.write(MiB - 512, b"\x55" * 512)
            await node.truncate(4 * MiB)
            await node.write(3 * MiB, b"\x66" * 4096)
            await node.flush()
            await node.truncate(3 * MiB + 4096)
            await node.flush()
            done = True
        except PowerCut:
            pass
        calls = dev.calls
        crashed = dev.after_power_cut(rng)
        dev.dead = True
        await g.close_all()
        img.write_bytes(crashed)
        return done, calls

    done, total = await attempt(None, random.Random(0))
    assert done and total > 10
    for cut in range(1, total + 1):
        rng = random.Random(cut)
        await attempt(cut, rng)
        r = run("qemu-img", "check", "--output=json", str(img), check=False)
        assert r.returncode in (0, 3), f"cut at call {cut}: {r.stdout}{r.stderr}"
        got = to_raw(img, tmp_path / "rs.raw")
        assert len(got) in (MiB, 4 * MiB, 3 * MiB + 4096), (cut, len(got))
        assert got[: MiB - 512] == b"\x44" * (MiB - 512), f"cut at call {cut}: old data lost"
