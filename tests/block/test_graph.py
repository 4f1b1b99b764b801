"""BlockGraph: names, ownership, users and deletion, with QEMU's texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from exportd.block import driver_class, known_drivers, register_driver
from exportd.block.graph import BlockGraph
from exportd.block.node import BlockNode, Perm
from exportd.errors import BlockError
from tests.support.images import make_pattern_image as make_image


async def expect(coro, text: str) -> None:  # noqa: ANN001
    with pytest.raises(BlockError) as e:
        await coro
    assert e.value.desc == text
    assert e.value.cls == "GenericError"


async def test_names(graph: BlockGraph) -> None:
    await expect(graph.add({"driver": "null-co"}), "'node-name' must be specified for the root node")
    await expect(graph.add({"driver": "null-co", "node-name": "#x"}), "Invalid node-name: '#x'")
    await expect(graph.add({"driver": "null-co", "node-name": "1a"}), "Invalid node-name: '1a'")
    await expect(graph.add({"driver": "null-co", "node-name": "a" * 32}), "Node name too long")
    await graph.add({"driver": "null-co", "node-name": "a-b.c_d"})
    await expect(graph.add({"driver": "null-co", "node-name": "a-b.c_d"}),
                 "Duplicate nodes with node-name='a-b.c_d'")
    await expect(graph.add({"driver": "vmdk", "node-name": "n"}),
                 "Parameter 'driver' does not accept value 'vmdk'")
    with pytest.raises(BlockError) as e:
        graph.get("zz")
    assert e.value.desc == "Cannot find device='' nor node-name='zz'"
    await expect(graph.add({"driver": "null-co", "node-name": "w", "force-share": True}),
                 "force-share=on can only be used with read-only images")


async def test_delete_rules(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    make_image(path, 8192)
    await expect(graph.delete("nope"), "Failed to find node with node-name='nope'")
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    r = await graph.add({"driver": "raw", "node-name": "r", "file": "f"})
    r2 = await graph.add({"driver": "raw", "node-name": "r2",
                          "file": {"driver": "file", "filename": str(path)}})
    child = r2.children["file"]
    assert child.node_name.startswith("#block") and not child.monitor_owned
    await expect(graph.delete("f"), "Block device f is in use")
    await expect(graph.delete(child.node_name), f"Node {child.node_name} is not owned by the monitor")
    user = r.attach("export", Perm.CONSISTENT_READ, Perm.ALL)
    await expect(graph.delete("r"), "Node r is in use")
    r.detach(user)
    await graph.delete("r")
    assert f.refcount == 0
    await graph.delete("r2")  # takes its nested child along
    assert [n.node_name for n in graph.nodes()] == ["f"]
    assert child.fd == -1  # closed
    await graph.delete("f")
    assert graph.nodes() == []


async def test_users_conflict(graph: BlockGraph) -> None:
    n = await graph.add({"driver": "null-co", "node-name": "n"})
    a = n.attach("A", Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    with pytest.raises(BlockError, match="write"):
        n.attach("B", Perm.WRITE, Perm.ALL)
    b = n.attach("B", Perm.CONSISTENT_READ, Perm.ALL)
    with pytest.raises(BlockError):
        n.update(b, Perm.CONSISTENT_READ | Perm.RESIZE, Perm.ALL)
    assert b.perm == Perm.CONSISTENT_READ  # unchanged after the refusal
    n.detach(a)
    n.update(b, Perm.CONSISTENT_READ | Perm.RESIZE, Perm.ALL)
    assert n.refcount == 1


async def test_registry_lazy_and_pluggable() -> None:
    assert {"file", "host_device", "raw", "null-co"} <= set(known_drivers())
    assert driver_class("no-such-driver") is None

    @register_driver
    class EchoNode(BlockNode):  # a new driver only has to register itself
        driver = "x-test-echo"

        @classmethod
        async def open(cls, graph, node_name, options):  # noqa: ANN001, ANN206
            return cls(node_name, read_only=options["read-only"])

        async def read(self, offset: int, length: int) -> bytes:
            return b"e" * length

        async def write(self, offset, data, *, fua=False) -> None:  # noqa: ANN001
            pass

        def getlength(self) -> int:
            return 4096

    g = BlockGraph(None)
    node = await g.add({"driver": "x-test-echo", "node-name": "e"})
    assert await node.read(0, 3) == b"eee"
    await g.close_all()


async def test_failed_format_open_releases_its_file(graph: BlockGraph, tmp_path: Path) -> None:
    if driver_class("qcow2") is None:
        pytest.skip("qcow2 driver not present")
    path = tmp_path / "not-qcow2.img"
    make_image(path, 65536)
    with pytest.raises(BlockError):
        await graph.add({"driver": "qcow2", "node-name": "q",
                         "file": {"driver": "file", "filename": str(path)}})
    assert graph.nodes() == []
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    with pytest.raises(BlockError):
        await graph.add({"driver": "qcow2", "node-name": "q", "file": "f"})
    # no user left on f, and none of the lock bytes the format had taken
    assert [n.node_name for n in graph.nodes()] == ["f"] and f.refcount == 0
    assert not f._lock.perm and not f._lock.unshared
