"""Random operation sequences on file and raw nodes against a bytearray model
(hypothesis, a few dozen short sequences each)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exportd.block.graph import BlockGraph
from exportd.block.node import Perm

SIZE = 64 * 1024
ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "zeroes", "discard", "flush"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 9000),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=25,
)


async def run_sequence(path: Path, opts: dict, window: tuple[int, int] | None, sequence: list) -> None:
    data = bytes((i * 13) & 0xFF for i in range(SIZE))
    path.write_bytes(data)
    model = bytearray(data)
    g = BlockGraph(None)
    try:
        node = await g.add({"driver": "file", "node-name": "f", "filename": str(path), **opts})
        base = 0
        size = SIZE
        if window is not None:
            base, size = window
            node = await g.add({"driver": "raw", "node-name": "r", "file": "f", "offset": base, "size": size})
        node.attach("test", Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL)
        for op, off, n, byte in sequence:
            off %= size
            n = min(n, size - off)
            if op == "read":
                assert bytes(await node.read(off, n)) == bytes(model[base + off : base + off + n])
            elif op == "write":
                await node.write(off, bytes([byte]) * n, fua=byte & 1 == 1)
                model[base + off : base + off + n] = bytes([byte]) * n
            elif op == "zeroes":
                await node.write_zeroes(off, n, may_unmap=byte & 1 == 1)
                model[base + off : base + off + n] = bytes(n)
            elif op == "discard":
                await node.discard(off, n)
                if opts.get("discard") == "unmap":  # a punched hole reads as zeroes
                    model[base + off : base + off + n] = bytes(n)
                # with discard=ignore nothing changes: later reads check that
            else:
                await node.flush()
        await node.flush()
        assert path.read_bytes() == bytes(model)
    finally:
        await g.close_all()


def check(opts: dict, window: tuple[int, int] | None, sequence: list) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run_sequence(Path(d) / "m.img", opts, window, sequence))


common = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(ops)
def test_file_buffered(sequence: list) -> None:
    check({"discard": "unmap"}, None, sequence)


@common
@given(ops)
def test_file_direct(sequence: list) -> None:
    check({"cache": {"direct": True}}, None, sequence)


@common
@given(ops, st.integers(0, 20000), st.integers(1, 60))
def test_raw_window(sequence: list, offset: int, sectors: int) -> None:
    size = min(sectors * 512, (SIZE - offset) // 512 * 512)
    if size == 0:
        return
    check({}, (offset, size), sequence)
