"""Images made by qemu-img read through the qcow2 node byte-for-byte as
`qemu-img convert -O raw` gives; block_status agrees with `qemu-img map`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exportd.block.node import Status
from tests.support.qcow2 import open_qcow2, read_all, run, to_raw
from tests.support.qcow2_variants import VARIANTS, build


@pytest.mark.parametrize("variant", VARIANTS)
async def test_read_matches_qemu_img(graph, tmp_path: Path, variant: str) -> None:
    img = build(variant, tmp_path)
    ref = to_raw(img, tmp_path / "ref.raw")
    node = await open_qcow2(graph, img, **{"read-only": True})
    assert node.getlength() == len(ref)
    assert await read_all(node) == ref
    # unaligned small reads too
    for off, n in [(1, 1000), (65535, 3), (len(ref) - 700, 700), (12345, 200000)]:
        assert bytes(await node.read(off, n)) == ref[off : off + n]


def _sector_map(intervals: list[tuple[int, int, bool, bool]], size: int) -> list[tuple[bool, bool]]:
    """Per sector (data, zero). Where the image has data, QEMU asks the file and may
    add 'zero' over file holes with heuristics of its own: compare 'data' there."""
    out = [(False, False)] * (size // 512)
    for start, length, data, zero in intervals:
        for s in range(start // 512, (start + length) // 512):
            out[s] = (data, zero and not data)
    return out


@pytest.mark.parametrize("variant", ["v3-64k", "v3-512", "v2", "backing3", "compressed-zlib", "snapshots"])
async def test_block_status_matches_qemu_img_map(graph, tmp_path: Path, variant: str) -> None:
    img = build(variant, tmp_path)
    qmap = json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
    node = await open_qcow2(graph, img, **{"read-only": True})
    size = node.getlength()
    ours = []
    pos = 0
    while pos < size:
        bs = await node.block_status(pos, size - pos)
        assert bs.length > 0
        ours.append((pos, bs.length, bool(bs.status & Status.DATA), bool(bs.status & Status.ZERO)))
        pos += bs.length
    assert ours[-1][0] + ours[-1][1] == size
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in qmap]
    assert _sector_map(ours, size) == _sector_map(theirs, size)
