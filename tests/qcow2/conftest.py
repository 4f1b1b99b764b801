from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from exportd.block.graph import BlockGraph


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph(None)
    try:
        yield g
    finally:
        await g.close_all()
