"""The host_device driver on a real block device (a loop device)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.errors import BlockError
from tests.support.images import make_pattern_image as make_image

MiB = 1 << 20


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup not installed")
    backing = tmp_path / "loop.img"
    make_image(backing, 4 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.parametrize("direct", [False, True])
async def test_host_device_io(graph: BlockGraph, loopdev: tuple[str, Path], direct: bool) -> None:
    dev, backing = loopdev
    model = bytearray(backing.read_bytes())
    with pytest.raises(BlockError, match="to be a regular file"):
        await graph.add({"driver": "file", "node-name": "x", "filename": dev})
    node = await graph.add({"driver": "host_device", "node-name": "d", "filename": dev,
                            "cache": {"direct": direct}, "discard": "unmap"})
    assert node.getlength() == 4 * MiB
    if direct:
        assert node.request_alignment >= 512
    await node.write(1001, b"device bytes")
    model[1001:1013] = b"device bytes"
    assert bytes(await node.read(990, 40)) == bytes(model[990:1030])
    await node.write_zeroes(MiB, 65536)
    model[MiB : MiB + 65536] = bytes(65536)
    await node.flush()
    with pytest.raises(OSError):
        await node.truncate(8 * MiB)
    await node.truncate(4 * MiB)  # same size: fine
    assert await node.allocated_size() == -1
    await graph.delete("d")
    with open(dev, "rb") as f:  # what the device really holds
        assert f.read(2 * MiB) == bytes(model[: 2 * MiB])
