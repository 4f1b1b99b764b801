"""Edges (QEMU's BdrvChild): every parent holds its node through one, and
BlockGraph.replace_node moves them all at once, permissions checked first."""

from __future__ import annotations

from pathlib import Path

import pytest

from exportd.block.graph import BlockGraph
from exportd.block.node import Perm
from exportd.errors import BlockError


class Holder:
    """A parent that is not a node (an export or a job, say)."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, str]] = []

    def describe(self) -> str:
        return "test holder"

    def edge_moved(self, edge, old) -> None:  # noqa: ANN001
        self.moves.append((old.node_name, edge.node.node_name))


async def two_files(graph: BlockGraph, tmp_path: Path, *, b_read_only: bool = False):  # noqa: ANN201
    (tmp_path / "a.img").write_bytes(b"A" * 65536)
    (tmp_path / "b.img").write_bytes(b"B" * 65536)
    a = await graph.add({"driver": "file", "node-name": "fa", "filename": str(tmp_path / "a.img")})
    b = await graph.add({"driver": "file", "node-name": "fb", "filename": str(tmp_path / "b.img"),
                         "read-only": b_read_only})
    return a, b


async def test_replace_moves_every_parent_and_keeps_permissions(graph: BlockGraph, tmp_path: Path) -> None:
    a, b = await two_files(graph, tmp_path)
    top = await graph.add({"driver": "raw", "node-name": "top", "file": "fa"})
    holder = Holder()
    edge = a.attach(holder, Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL, "root")
    assert bytes(await top.read(0, 4)) == b"AAAA"

    moved = graph.replace_node(a, b)

    assert {id(e) for e in moved} == {id(edge), id(top.child_edges["file"])}
    assert edge.node is b and top.child("file") is b
    assert a.users == [] and len(b.users) == 2
    assert b.combined_perm()[0] & Perm.WRITE  # the holder's write moved with it
    assert not a.combined_perm()[0] & Perm.WRITE
    assert holder.moves == [("fa", "fb")]
    assert bytes(await top.read(0, 4)) == b"BBBB"  # the format parent reads the new child
    b.detach(edge)
    await graph.delete("top")
    await graph.delete("fa")


async def test_conflict_on_the_new_node_moves_nothing(graph: BlockGraph, tmp_path: Path) -> None:
    a, b = await two_files(graph, tmp_path, b_read_only=True)
    holder = Holder()
    edge = a.attach(holder, Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL, "root")
    reader = Holder()
    edge2 = a.attach(reader, Perm.CONSISTENT_READ, Perm.ALL, "root")
    with pytest.raises(BlockError, match="read-only"):
        graph.replace_node(a, b)
    assert edge.node is a and edge2.node is a  # all or nothing
    assert len(a.users) == 2 and b.users == []
    assert holder.moves == [] and reader.moves == []
    a.detach(edge)
    a.detach(edge2)


async def test_unshared_permission_on_the_new_node_refuses_the_move(graph: BlockGraph, tmp_path: Path) -> None:
    a, b = await two_files(graph, tmp_path)
    owner = Holder()
    keep = b.attach(owner, Perm.CONSISTENT_READ, Perm.CONSISTENT_READ, "root")  # shares no write
    writer = Holder()
    edge = a.attach(writer, Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL, "root")
    with pytest.raises(BlockError, match="write"):
        graph.replace_node(a, b)
    assert edge.node is a and b.users == [keep]
    a.detach(edge)
    b.detach(keep)


async def test_overlay_keeps_its_own_edge_to_the_replaced_node(graph: BlockGraph, tmp_path: Path) -> None:
    # the shape of blockdev-snapshot: `over` sits on `fa`; every other
    # parent of `fa` moves to `over`, but over's own edge stays on fa
    a, _ = await two_files(graph, tmp_path)
    over = await graph.add({"driver": "raw", "node-name": "over", "file": "fa"})
    holder = Holder()
    edge = a.attach(holder, Perm.CONSISTENT_READ, Perm.ALL, "root")
    moved = graph.replace_node(a, over)
    assert moved == [edge] and edge.node is over
    assert over.child("file") is a
    over.detach(edge)
    await graph.delete("over")


async def test_replacing_a_node_by_itself_moves_nothing(graph: BlockGraph, tmp_path: Path) -> None:
    a, _ = await two_files(graph, tmp_path)
    holder = Holder()
    edge = a.attach(holder, Perm.CONSISTENT_READ, Perm.ALL, "root")
    assert graph.replace_node(a, a) == []
    assert edge.node is a and holder.moves == []
    a.detach(edge)
