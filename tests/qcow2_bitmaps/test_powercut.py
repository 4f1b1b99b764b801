"""Power cuts while exportd works on persistent bitmaps: opening read-write
(IN_USE set in place), writes, a bitmap removed, a new one added, and the
store at close. The device (tests.qcow2.test_powercut) forgets any subset of
what was written since the last flush. At every cut, the image must pass
`qemu-img check` (leaks allowed, no corruption), `qemu-img info` must read
its bitmap directory, and every bitmap found must be either inconsistent
(IN_USE: not trusted) or hold exactly the bits of before or of after: never
a mix, never wrong bits taken for good ones."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

from exportd.block import bitmaps
from exportd.block.graph import BlockGraph
from tests.qcow2.test_powercut import PowerCutDevice, powercut_driver  # noqa: F401
from tests.qcow2_bitmaps import qb

MiB = 1 << 20


async def session(img: Path, cut_after: int | None, rng: random.Random) -> tuple[int, bytes]:
    """The work, on the power-cut device over `img`: (device calls made,
    the disk as the cut left it)."""
    g = BlockGraph(None)
    dev = await g.add({"driver": "x-powercut-test", "node-name": "dev", "filename": str(img)})
    assert isinstance(dev, PowerCutDevice)
    dev.cut_after = cut_after
    try:
        node = await g.add({"driver": "qcow2", "node-name": "q", "file": "dev"})
        await node.write(3 * MiB, b"\x55" * 70000)
        new = bitmaps.create(node, "new", 4096, persistent=True)
        bitmaps.attach(new)
        await node.write(100_000, b"\xaa" * 9000)
        await node.remove_persistent_bitmap("gone")
        bitmaps.detach(bitmaps.lookup(node, "gone"))
        await node.write(2 * MiB - 512, b"\x11" * 1024)
        await g.delete("q")  # stores the bitmaps
    except Exception as e:  # a cut surfaces as PowerCut, OSError or BlockError, as the layer above makes it
        if not dev.dead:
            raise AssertionError(f"failed without a power cut: {e!r}") from e
    crashed = dev.after_power_cut(rng)
    dev.dead = True
    await g.close_all()
    return dev.calls, crashed


async def loaded(img: Path) -> dict[str, Any]:
    """name -> "inconsistent" or (sha256, count), as exportd loads the image."""
    g = BlockGraph(None)
    try:
        node = await g.add({"driver": "qcow2", "node-name": "q", "read-only": True,
                            "file": {"driver": "file", "filename": str(img)}})
        return {bm.name: "inconsistent" if bm.inconsistent else (bm.bits.sha256(), bm.count())
                for bm in node.dirty_bitmaps}
    finally:
        await g.close_all()


async def test_power_cut_anywhere_in_the_life_of_bitmaps(tmp_path: Path, powercut_driver: None) -> None:  # noqa: F811
    img = qb.new_image(tmp_path / "w", 4 * MiB, "b0", "gone", "--disable -g 512 off")
    qb.run("qemu-io", "-f", "qcow2", "-c", "write 1M 300k", str(img))  # recorded in b0 and gone
    qb.run("qemu-img", "bitmap", "--enable", str(img), "off")
    qb.run("qemu-io", "-f", "qcow2", "-c", "write 0 1k", str(img))
    qb.run("qemu-img", "bitmap", "--disable", str(img), "off")
    pristine = img.read_bytes()
    before = await loaded(img)
    assert set(before) == {"b0", "gone", "off"} and "inconsistent" not in before.values()

    total, finished = await session(img, None, random.Random(0))
    img.write_bytes(finished)
    after = await loaded(img)
    assert set(after) == {"b0", "off", "new"} and after["b0"] != before["b0"], after
    qb.run("qemu-img", "check", str(img))

    seen: set[str] = set()
    for cut in range(1, total + 1):
        rng = random.Random(cut)
        img.write_bytes(pristine)
        _, crashed = await session(img, cut, rng)
        img.write_bytes(crashed)
        r = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True)
        assert r.returncode in (0, 3), (cut, r.stdout + r.stderr)
        info = json.loads(qb.run("qemu-img", "info", "--output=json", str(img)).stdout)
        listed = {b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])}
        got = await loaded(img)
        assert set(got) == listed, (cut, got, listed)
        for name, state in got.items():
            if state == "inconsistent":
                seen.add(f"{name}:inconsistent")
            elif state == before.get(name):
                seen.add(f"{name}:before")
            else:
                assert state == after.get(name), (cut, name, state)
                seen.add(f"{name}:after")
    # the cuts did land at the interesting moments
    assert {"b0:inconsistent", "b0:after", "b0:before"} <= seen, seen
