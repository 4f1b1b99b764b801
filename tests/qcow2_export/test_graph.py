"""A backing chain built from named nodes (`backing` given as a node name),
each layer exported at once: base and middle read-only, the top writable with
writethrough. Writes to the top never show through the lower exports, the
lower images are unchanged, query-named-block-nodes shows the chain, deleting
a node in use is refused and loses nothing."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from tests.support.daemon import Exportd
from tests.support.qcow2_export import check_clean, compare_raw, convert_raw, fileops, read_mount
from tests.support.qcow2_variants import build
from tests.support.threads import athread

LAYERS = [("b", "base3.qcow2", None), ("m", "mid3.qcow2", "b"), ("t", "backing3.qcow2", "m")]


def keep_reading(paths_and_data: list[tuple[Path, bytes]], done: threading.Event) -> int:
    """Until `done`, read the lower exports in 256 KiB pieces; they must never change."""
    rounds = 0
    fds = [(os.open(p, os.O_RDONLY), want) for p, want in paths_and_data]
    try:
        while not done.is_set() or rounds < 2:
            for fd, want in fds:
                for off in range(0, len(want), 256 * 1024):
                    assert os.pread(fd, 256 * 1024, off) == want[off : off + 256 * 1024], off
            rounds += 1
    finally:
        for fd, _ in fds:
            os.close(fd)
    return rounds


async def test_each_layer_of_a_named_chain_exported(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    await athread(build, "backing3", workdir, timeout=60)
    before = {n: await convert_raw(workdir / f, workdir / f"{n}-before.raw") for n, f, _ in LAYERS}
    nodes_added: list[str] = []
    exports_added: list[str] = []
    try:
        for n, f, backing in LAYERS:
            opts = {"driver": "qcow2", "node-name": n, "backing": backing,
                    "file": {"driver": "file", "filename": str(workdir / f)}}
            if n != "t":
                opts["read-only"] = True
            await d.cmd("blockdev-add", opts)
            nodes_added.append(n)
            (workdir / f"mnt-{n}").touch()
            await d.add_export(f"e{n}", n, workdir / f"mnt-{n}", writable=n == "t",
                               writethrough=n == "t")
            exports_added.append(f"e{n}")
        nodes = {x["node-name"]: x for x in await d.cmd("query-named-block-nodes")}
        assert nodes["t"]["backing_file_depth"] == 2 and nodes["m"]["backing_file_depth"] == 1
        assert nodes["t"]["image"]["backing-image"]["backing-image"]["filename"].endswith("base3.qcow2")
        assert "in use" in await d.error("blockdev-del", {"node-name": "b"})
        assert "in use" in await d.error("blockdev-del", {"node-name": "m"})
        for n, _, _ in LAYERS:
            assert await read_mount(workdir / f"mnt-{n}") == before[n], n

        ref = workdir / "t-ref.raw"
        ref.write_bytes(before["t"])
        done = threading.Event()
        lower = [(workdir / "mnt-b", before["b"]), (workdir / "mnt-m", before["m"])]
        reader = asyncio.ensure_future(asyncio.to_thread(keep_reading, lower, done))
        try:
            await fileops(workdir / "mnt-t", "named-chain", 60, "fuse")
        finally:
            done.set()
            await asyncio.wait_for(reader, 60)
        await fileops(ref, "named-chain", 60, "ref")
        assert await read_mount(workdir / "mnt-t") == ref.read_bytes()
    finally:
        for e in exports_added:
            await d.del_export(e)
        for n in reversed(nodes_added):
            await d.cmd("blockdev-del", {"node-name": n})
    for _, f, _ in LAYERS:
        await check_clean(workdir / f)
    await compare_raw(workdir / "backing3.qcow2", ref)
    for n, f, _ in LAYERS[:2]:
        assert await convert_raw(workdir / f, workdir / f"{n}-after.raw") == before[n], n
