"""The job filter orders a job's copies with the writes that pass through
it: with serialize_writes a write holds its range until the job has heard
of it, so a copy that read the old bytes cannot land after the write (the
write-blocking mirror lost a write that way under load)."""

from __future__ import annotations

import asyncio

from exportd.block.graph import BlockGraph
from exportd.block.jobs.filter import JobFilter
from exportd.block.node import BlockNode, Edge, Perm


async def filter_over_null(graph: BlockGraph) -> tuple[BlockNode, JobFilter, Edge]:
    """A job filter with serialized writes over a null node."""
    inner = await graph.add({"driver": "null-co", "node-name": "n", "size": 1 << 20})
    filt = JobFilter("f", "mirror_top", "backing", owner=None)
    edge = inner.attach(filt, Perm.WRITE | Perm.CONSISTENT_READ, Perm.ALL, "backing")
    filt.child_edges["backing"] = edge
    filt.serialize_writes = True
    return inner, filt, edge


async def test_a_copy_waits_for_a_write_and_its_hook(graph: BlockGraph) -> None:
    inner, filt, edge = await filter_over_null(graph)
    order: list[str] = []
    hook_may_finish = asyncio.Event()

    async def written(offset: int, length: int, data: object) -> None:
        order.append("write hook starts")
        await hook_may_finish.wait()  # the write-blocking copy to the target, say
        order.append("write hook ends")

    filt.written = written
    write = asyncio.ensure_future(filt.write(4096, b"x" * 4096))
    await asyncio.sleep(0.01)
    assert order == ["write hook starts"]

    async def copy() -> None:
        token = await filt.locks.acquire(0, 65536)  # the job's copy of the chunk
        order.append("copy")
        filt.locks.release(token)

    copier = asyncio.ensure_future(copy())
    await asyncio.sleep(0.01)
    assert order == ["write hook starts"], "the copy ran while the write held its range"
    hook_may_finish.set()
    await asyncio.gather(write, copier)
    assert order == ["write hook starts", "write hook ends", "copy"]
    # and a write waits for a copy's range
    token = await filt.locks.acquire(0, 8192)
    late = asyncio.ensure_future(filt.write(0, b"y" * 512))
    await asyncio.sleep(0.01)
    assert not late.done()
    filt.locks.release(token)
    hook_may_finish.set()
    await late
    inner.detach(edge)


async def test_a_write_waiting_when_the_filter_goes_lands_on_its_node(graph: BlockGraph) -> None:
    inner, filt, edge = await filter_over_null(graph)
    landed: list[int] = []
    plain_write = inner.write

    async def write(offset: int, data: object, **kw: object) -> None:
        landed.append(offset)
        await plain_write(offset, data, **kw)  # type: ignore[arg-type]

    inner.write = write  # type: ignore[method-assign]
    token = await filt.locks.acquire(0, 65536)  # a job's copy holds the range
    waiting = asyncio.ensure_future(filt.write(4096, b"x" * 512))
    await asyncio.sleep(0.01)
    del filt.child_edges["backing"]  # the job ends: the filter is dropped
    inner.detach(edge)
    filt.locks.release(token)
    await waiting
    assert landed == [4096]
