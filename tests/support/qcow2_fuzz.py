"""Seeded fuzzer for the qcow2 driver, run as a child process (under a memory
limit) by test_fuzz.py: mutate headers, extensions and tables of valid images,
open them, read, walk block_status, write. Only BlockError/OSError are allowed
to come out; anything else (or a hang, or a huge allocation) is a failure.
Prints one JSON line per failing case and `CASE n` before each case."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import shutil
import struct
import sys
import traceback
from pathlib import Path

INTERESTING64 = [0, 1, 0x200, 0x10000, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1, 0x8000000000000000,
                 0x4000000000000000, 0x00FFFFFFFFFFFE00]
INTERESTING32 = [0, 1, 8, 9, 21, 22, 31, 104, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000]
HEADER_FIELDS = [  # (offset, width)
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
    (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]


def _tables(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the L1 table, refcount table, first L2 tables and refcount blocks."""
    out = []
    try:
        cbits = struct.unpack_from(">I", data, 20)[0]
        cs = 1 << cbits
        l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
        rt_off, rt_cl = struct.unpack_from(">QI", data, 48)
        out.append((l1_off, l1_size * 8))
        out.append((rt_off, min(rt_cl * cs, 4096)))
        for i in range(min(l1_size, 8)):
            e = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            if e and e + cs <= len(data):
                out.append((e, cs))
        rb = struct.unpack_from(">Q", data, rt_off)[0] & ~0x1FF
        if rb and rb + cs <= len(data):
            out.append((rb, cs))
        out.append((cs, min(cs, len(data) - cs)))  # whatever follows the header
    except (struct.error, OverflowError):
        pass
    return [(o, n) for o, n in out if 0 < n and o + n <= len(data)]


def mutate(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        if r < 0.45:
            off, width = rng.choice(HEADER_FIELDS)
            if width == 8:
                v = rng.choice(INTERESTING64 + [rng.getrandbits(64)])
                v2 = struct.unpack_from(">Q", data, off)[0]
                v = rng.choice([v, v2 ^ (1 << rng.randrange(64)), v2 + rng.choice([-512, 512, 1])]) % (1 << 64)
                struct.pack_into(">Q", data, off, v)
            elif width == 4:
                v = rng.choice(INTERESTING32 + [rng.getrandbits(32)])
                struct.pack_into(">I", data, off, v)
            else:
                data[off] = rng.randrange(256)
        elif r < 0.6:  # header extension area
            off = rng.randrange(72, 512)
            data[off] = rng.randrange(256)
        else:  # a table entry
            tables = _tables(bytes(data))
            if not tables:
                continue
            off, n = rng.choice(tables)
            pos = off + rng.randrange(0, max(1, n // 8)) * 8
            if pos + 8 > len(data):
                continue
            old = struct.unpack_from(">Q", data, pos)[0]
            v = rng.choice([rng.getrandbits(64), old ^ (1 << rng.randrange(64)), old + 512,
                            old | (1 << 63), old & ~(1 << 63), old | 1, 0, rng.choice(INTERESTING64)])
            struct.pack_into(">Q", data, pos, v % (1 << 64))


async def exercise(path: Path, rng: random.Random) -> None:
    from exportd.block.graph import BlockGraph

    g = BlockGraph(None)
    writable = rng.random() < 0.5
    try:
        node = await g.add({"driver": "qcow2", "node-name": "f", "read-only": not writable,
                            "discard": "unmap", "file": {"driver": "file", "filename": str(path)}})
        size = node.getlength()
        span = min(size, 8 << 20)
        for off in [0] + [rng.randrange(0, max(1, size)) for _ in range(6)]:
            n = min(1 << 20, size - off)
            if n > 0:
                data = await node.read(off, n)
                assert len(data) == n, "short read"
        pos, steps = 0, 0
        while pos < span and steps < 200:
            bs = await node.block_status(pos, size - pos)
            assert bs.length > 0, "block_status made no progress"
            pos += bs.length
            steps += 1
        if writable and span:
            for _ in range(10):
                off = rng.randrange(0, span)
                ln = min(rng.choice([1, 4096, 70000]), span - off)
                k = rng.random()
                try:
                    if k < 0.7:
                        await node.write(off, rng.randbytes(ln))
                    elif k < 0.85:
                        await node.write_zeroes(off, ln, may_unmap=True)
                    else:
                        await node.discard(off, ln)
                except OSError:
                    pass
            await node.flush()
    finally:
        await g.close_all()


async def run_cases(images: list[Path], start: int, count: int, workdir: Path) -> int:
    from exportd.errors import BlockError

    failures = 0
    for case in range(start, start + count):
        rng = random.Random(case)
        src = rng.choice(images)
        data = bytearray(src.read_bytes())
        mutate(data, rng)
        path = workdir / "case.qcow2"
        path.write_bytes(data)
        for extra in src.parent.glob("fz-backing*"):
            if not (workdir / extra.name).exists():
                shutil.copy(extra, workdir / extra.name)
        print(f"CASE {case} {src.name}", flush=True)
        try:
            await asyncio.wait_for(exercise(path, rng), timeout=10)
        except (BlockError, OSError):
            pass
        except Exception as e:  # anything else is a bug
            failures += 1
            print(json.dumps({"case": case, "image": src.name, "error": repr(e),
                              "trace": traceback.format_exc()}), flush=True)
    return failures


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a huge allocation fails loudly
    imgdir, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    images = sorted(p for p in imgdir.glob("*.qcow2"))
    n = asyncio.run(run_cases(images, int(sys.argv[3]), int(sys.argv[4]), workdir))
    print(f"FAILURES {n}", flush=True)
