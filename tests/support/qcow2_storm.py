"""Write storm for the kill -9 test (tests/qcow2/test_crash.py). Run as a script
(python -m tests.support.qcow2_storm IMAGE SEED COUNT): it opens an image through
the qcow2 node and does seeded writes, flushing now and then and printing
`ACK n` once the first n operations are durable. The parent replays the same
operations (ops()) to know what must be on disk."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Iterator


def ops(seed: int, size: int, count: int) -> Iterator[tuple[str, int, int, int]]:
    rng = random.Random(seed)
    for i in range(count):
        off = rng.randrange(0, size // 512) * 512 + rng.choice([0, 0, 17])
        ln = min(rng.choice([512, 3000, 4096, 65536, 100_000, 300_000]), size - off)
        r = rng.random()
        kind = "write" if r < 0.8 else "zero" if r < 0.9 else "discard"
        yield kind, off, ln, i


def data_for(seed: int, i: int, ln: int) -> bytes:
    return random.Random(seed * 100003 + i).randbytes(ln)


def apply(model: bytearray, op: tuple[str, int, int, int], seed: int, cs: int) -> None:
    kind, off, ln, i = op
    if kind == "write":
        model[off : off + ln] = data_for(seed, i, ln)
    elif kind == "zero":
        model[off : off + ln] = bytes(ln)
    else:  # discard: whole clusters read as zeroes afterwards (v3, or no backing)
        a = -(-off // cs) * cs
        b = (off + ln) // cs * cs
        if off + ln == len(model):
            b = len(model)
        if b > a:
            model[a:b] = bytes(b - a)


async def main(path: str, seed: int, count: int) -> None:
    from exportd.block.graph import BlockGraph

    g = BlockGraph(None)
    node = await g.add({"driver": "qcow2", "node-name": "s", "discard": "unmap",
                        "file": {"driver": "file", "filename": path}})
    size = node.getlength()
    batch: list = []
    ranges: list[tuple[int, int]] = []
    print("READY", flush=True)
    for op in ops(seed, size, count):
        kind, off, ln, i = op
        # ops in flight together never overlap, so the outcome is the sequential one
        if batch and (kind != "write" or len(batch) == 4
                      or any(off < e and s < off + ln for s, e in ranges)):
            await asyncio.gather(*batch)
            batch, ranges = [], []
        if kind == "write":
            batch.append(node.write(off, data_for(seed, i, ln)))
        elif kind == "zero":
            batch.append(node.write_zeroes(off, ln, may_unmap=bool(i & 1)))
        else:
            batch.append(node.discard(off, ln))
        ranges.append((off, off + ln))
        if i % 7 == 6:
            await asyncio.gather(*batch)
            batch, ranges = [], []
            await node.flush()
            print(f"ACK {i + 1}", flush=True)
    await asyncio.gather(*batch)
    await node.flush()
    print(f"ACK {count}", flush=True)
    await g.close_all()
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
