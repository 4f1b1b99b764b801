"""x-debug-query-block-graph: for the same graph, the same nodes (ids, types,
names) and edges (ids, names) as qemu-storage-daemon 7.2; permissions agree
except where exportd's exports and snapshots take others (README); and the
rule for parents that are not nodes (block-backend "" by default, or what
they declare)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from exportd.block.graph_query import block_graph
from exportd.block.node import Perm
from tests.support.qsd import QSD, replies_of_both

MiB = 1 << 20


def images(d: Path) -> None:
    for name in ("base.qcow2", "top.qcow2", "plain.img"):
        (d / name).unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(MiB)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "top.qcow2"), str(MiB)], check=True)
    (d / "plain.img").write_bytes(bytes(MiB))
    for m in ("a.raw", "b.raw"):
        (d / m).touch()


def script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("x-debug-query-block-graph", {}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": str(d / "base.qcow2"), "node-name": "base-file"}}),
        ("blockdev-add", {"driver": "file", "node-name": "plain-file", "filename": str(d / "plain.img")}),
        ("blockdev-add", {"driver": "raw", "node-name": "plain", "file": "plain-file", "offset": 4096}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                          "file": {"driver": "file", "filename": str(d / "top.qcow2"), "node-name": "top-file"}}),
        ("x-debug-query-block-graph", {}),
        ("block-export-add", {"type": "fuse", "id": "a", "node-name": "top", "writable": True,
                              "mountpoint": str(d / "a.raw")}),
        ("block-export-add", {"type": "fuse", "id": "b", "node-name": "plain", "mountpoint": str(d / "b.raw")}),
        ("x-debug-query-block-graph", {}),
        ("query-block", {}),
        ("block-export-del", {"id": "a"}),
        ("block-export-del", {"id": "b"}),
    ]


def without_perms(reply: dict[str, Any]) -> dict[str, Any]:
    g = reply["return"]
    return {"nodes": g["nodes"], "edges": [{k: e[k] for k in ("parent", "child", "name")} for e in g["edges"]]}


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_graph_same_as_qemu(daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    steps = script(work)
    started = []
    ours, theirs = await replies_of_both(tmp_path, lambda: images(work), steps,
                                         lambda: (started.append(daemon()) or started[0].socket))
    started[0].terminate()
    graphs = [i for i, s in enumerate(steps) if s[0] == "x-debug-query-block-graph"]
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        if i in graphs:
            assert without_perms(a) == without_perms(b), i
        else:
            assert a == b, (i, step)
    assert ours[graphs[0]] == theirs[graphs[0]] == {"return": {"nodes": [], "edges": []}}
    assert len(theirs[graphs[-1]]["return"]["nodes"]) == 8  # 6 nodes, 2 anonymous backends
    # permissions, once every node is in use: what a node takes from its
    # child is the same (on an idle node QEMU takes nothing from a backing
    # or raw child, exportd still reads; README), what it shares may differ
    # (exportd's raw lets others resize its file), and an export's root edge
    # may lack resize (exportd's takes it only when growable)
    a_graph, b_graph = ours[graphs[-1]]["return"], theirs[graphs[-1]]["return"]
    names = {n["id"]: n for n in b_graph["nodes"]}
    for ea, eb in zip(a_graph["edges"], b_graph["edges"], strict=True):
        if names[eb["parent"]]["type"] == "block-driver":
            assert ea["perm"] == eb["perm"], (ea, eb)
        else:
            assert ea["shared-perm"] == eb["shared-perm"]
            assert set(ea["perm"]) == set(eb["perm"]) - {"resize"}


class _Job:
    graph_node_type = "block-job"

    def graph_node_name(self) -> str:
        return "job0"


async def test_parents_that_are_not_nodes(host) -> None:
    await host.graph.add({"driver": "null-co", "node-name": "n0", "size": MiB})
    await host.graph.add({"driver": "raw", "node-name": "r0", "file": "n0"})
    r0, n0 = host.graph.get("r0"), host.graph.get("n0")
    job, backend = _Job(), object()
    e1 = r0.attach(backend, Perm.CONSISTENT_READ, Perm.ALL, "root")
    e2 = n0.attach(job, Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ, "target")
    e3 = r0.attach(job, Perm.CONSISTENT_READ, Perm.ALL, "source")
    try:
        g = block_graph(host.graph.nodes())
    finally:
        r0.detach(e1, e3)
        n0.detach(e2)
    # ids as QEMU counts: first mention (the backend's edge names r0 as 2)
    assert g["nodes"] == [
        {"id": 2, "type": "block-driver", "name": "r0"},
        {"id": 4, "type": "block-driver", "name": "n0"},
        {"id": 3, "type": "block-job", "name": "job0"},
        {"id": 1, "type": "block-backend", "name": ""},
    ]
    file_edge = g["edges"][0]
    assert g["edges"] == [
        {"parent": 2, "child": 4, "name": "file", "perm": file_edge["perm"], "shared-perm": file_edge["shared-perm"]},
        {"parent": 3, "child": 2, "name": "source", "perm": ["consistent-read"],
         "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"]},
        {"parent": 3, "child": 4, "name": "target", "perm": ["write", "consistent-read"],
         "shared-perm": ["consistent-read"]},
        {"parent": 1, "child": 2, "name": "root", "perm": ["consistent-read"],
         "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"]},
    ]
