"""Meta contexts: which a client may choose (LIST/SET_META_CONTEXT) and the
extents BLOCK_STATUS answers for them.

- base:allocation (proto.md): NBD_STATE_HOLE where the node has no data,
  NBD_STATE_ZERO where it reads as zeroes; from the node's block_status,
  which already looks through the backing chain.
- qemu:allocation-depth (QEMU's docs/interop/nbd.rst): 0 where no layer of
  the backing chain allocates the range, 1 where the top one does, 2 its
  backing node, and so on.
- qemu:dirty-bitmap:NAME (the export's `bitmaps`): NBD_STATE_DIRTY where
  the dirty bitmap NAME marks the range, 0 where it is clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from exportd.block.bitmaps import DirtyBitmap
from exportd.block.chain import backing_chain
from exportd.block.node import BlockNode, Status
from exportd.nbd import protocol as P

STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap flag

MAX_EXTENTS = 128 * 1024  # per reply and context: bounded replies for fragmented images

# context ids as QEMU numbers them (clients must not rely on it, but it helps comparing)
CONTEXT_IDS = {P.CONTEXT_BASE_ALLOCATION: 0, P.CONTEXT_QEMU_ALLOCATION_DEPTH: 1}


@dataclass
class Contexts:
    """What SET_META_CONTEXT chose, for which export name."""

    export_name: str | None = None
    ids: dict[str, int] = field(default_factory=dict)  # context name -> id

    @staticmethod
    def select(available: list[str], queries: list[str], listing: bool) -> list[tuple[int, str]]:
        """(id, name) of the available contexts the queries match. An empty
        query list lists everything (LIST) or chooses nothing (SET)."""
        def cid(name: str) -> int:
            # QEMU's numbering: its bitmaps follow the two fixed contexts
            return CONTEXT_IDS.get(name, 2 + available.index(name) - len(set(available) & set(CONTEXT_IDS)))

        if not queries:
            return [(cid(a), a) for a in available] if listing else []
        chosen: list[str] = []
        for q in queries:
            if q.endswith(":") and listing:  # "base:", "qemu:": the namespace's all (LIST only)
                match = [a for a in available if a.startswith(q)]
            else:
                match = [a for a in available if a == q]
            for m in match:
                if m not in chosen:
                    chosen.append(m)
        return [(cid(c), c) for c in chosen]


def _merge(out: list[tuple[int, int]], n: int, flags: int) -> None:
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + n, flags)
    else:
        out.append((n, flags))


async def _extents(offset: int, length: int, one: bool,
                   at: Callable[[int, int], Awaitable[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Descriptors (length, value) for [offset, offset + length), `at(pos, n)`
    giving the value at pos and how far it holds; merged, at most
    MAX_EXTENTS (one with REQ_ONE), yielding to the loop now and then."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    steps = 0
    while pos < end:
        value, n = await at(pos, end - pos)
        _merge(out, n, value)
        pos += n
        if one or len(out) >= MAX_EXTENTS:
            break
        steps += 1
        if steps % 256 == 0:
            await asyncio.sleep(0)
    if one:
        out = out[:1]
    return _clip32(out)


async def base_allocation_extents(node: BlockNode, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    async def at(pos: int, n: int) -> tuple[int, int]:
        st = await node.block_status(pos, n)
        n = min(st.length, n) if st.length > 0 else n
        return (0 if st.status & Status.DATA else P.STATE_HOLE) | (P.STATE_ZERO if st.status & Status.ZERO else 0), n

    return await _extents(offset, length, one, at)


async def _depth_at(chain: list[BlockNode], pos: int, n: int) -> tuple[int, int]:
    for depth, node in enumerate(chain, 1):
        if pos >= node.getlength():
            return 0, n  # past a shorter layer's end: nothing below allocates it
        st = await node.block_status(pos, n)
        if st.length > 0:
            n = min(n, st.length)
        if st.status & Status.ALLOCATED:
            return depth, n
    return 0, n


async def allocation_depth_extents(node: BlockNode, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    chain = backing_chain(node)
    return await _extents(offset, length, one, lambda pos, n: _depth_at(chain, pos, n))


async def dirty_bitmap_extents(bitmap: DirtyBitmap, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for _pos, n, dirty in bitmap.bits.runs(offset, length):
        _merge(out, n, STATE_DIRTY if dirty else 0)
        if one or len(out) >= MAX_EXTENTS:
            break
    return _clip32(out[:1] if one else out)


async def context_extents(node: BlockNode, bitmaps: dict[str, DirtyBitmap], context: str, offset: int,
                          length: int, one: bool) -> list[tuple[int, int]]:
    """BLOCK_STATUS's descriptors for one negotiated context; `bitmaps` are
    the export's, by context name."""
    if context == P.CONTEXT_BASE_ALLOCATION:
        return await base_allocation_extents(node, offset, length, one)
    if context == P.CONTEXT_QEMU_ALLOCATION_DEPTH:
        return await allocation_depth_extents(node, offset, length, one)
    return await dirty_bitmap_extents(bitmaps[context], offset, length, one)


def _clip32(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Descriptor lengths are 32 bits: split longer runs (never past 4 GiB - 512)."""
    limit = 0xFFFFFE00
    if all(n <= limit for n, _ in extents):
        return extents
    out: list[tuple[int, int]] = []
    for n, f in extents:
        while n > limit:
            out.append((limit, f))
            n -= limit
        if n:
            out.append((n, f))
    return out
