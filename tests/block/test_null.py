"""The null-co driver."""

from __future__ import annotations

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.node import Status


async def test_null_defaults_and_io(graph: BlockGraph) -> None:
    n = await graph.add({"driver": "null-co", "node-name": "n"})
    assert n.getlength() == 1 << 30 and n.filename() == "null-co://"
    assert bytes(await n.read(12345, 4096)) == bytes(4096)
    assert bytes(await n.read(0, 5 << 20)) == bytes(5 << 20)
    await n.write(0, b"dropped")
    await n.write_zeroes(0, 1 << 20)
    await n.flush()
    assert bytes(await n.read(0, 7)) == bytes(7)
    assert await n.allocated_size() == 0
    st = await n.block_status(0, 1 << 40)
    assert st.length == 1 << 30 and st.status & Status.EOF and st.status & Status.DATA


async def test_null_options(graph: BlockGraph) -> None:
    n = await graph.add({"driver": "null-co", "node-name": "n", "size": 65536, "read-zeroes": True,
                         "latency-ns": 1000, "read-only": True})
    assert n.getlength() == 65536
    assert (await n.block_status(4096, 4096)).status & Status.ZERO
    assert bytes(await n.read(0, 512)) == bytes(512)
    with pytest.raises(OSError):
        await n.write(0, b"x")
    with pytest.raises(Exception, match="Invalid parameter type for 'size'"):
        await graph.add({"driver": "null-co", "node-name": "m", "size": "big"})
