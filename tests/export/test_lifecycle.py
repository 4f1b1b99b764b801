"""The export life cycle (refcount, safe/hard delete, shutdown phases) on the
real ExportTable, BlockGraph and FUSE mounts, in this process.

The daemon object here (tests.support.host.Host) is only what the table
needs from exportd's Daemon (`graph` and `emit_event`), so that a test can
hold a reference the way a request in flight does and look at every phase
deterministically. All I/O on the mounts happens in worker threads, never on
this loop that serves them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from exportd.errors import QMPError
from tests.support.host import Host, add
from tests.support.mounts import fuse_mounts_under
from tests.support.threads import athread


async def null_node(h: Host, name: str = "null0", **opts: Any) -> None:
    opts = {k.replace("_", "-"): v for k, v in opts.items()}
    await h.graph.add({"driver": "null-co", "node-name": name, "size": 1 << 20, **opts})


async def test_request_in_flight_blocks_safe_delete(host: Host, workdir: Path) -> None:
    await null_node(host)
    exp = await add(host, workdir, "e")
    exp.ref()  # what a request in flight holds
    with pytest.raises(QMPError, match=r"^export 'e' still in use$"):
        host.exports.delete("e")
    host.exports.delete("e", "hard")
    assert host.exports.query()[0]["shutting-down"] is True
    with pytest.raises(QMPError, match=r"^Export 'e' is already shutting down$"):
        host.exports.delete("e")
    # the id stays taken until the export is really gone
    with pytest.raises(QMPError, match=r"^Block export id 'e' is already in use$"):
        await host.exports.add(
            {"type": "fuse", "id": "e", "node-name": "null0", "mountpoint": str(workdir / "o.raw")}
        )
    await asyncio.sleep(0.2)
    assert host.events == []
    exp.unref()
    await asyncio.wait_for(exp.wait_deleted(), 10)
    assert host.events == [("BLOCK_EXPORT_DELETED", {"id": "e"})]
    assert host.exports.query() == []
    exp2 = await add(host, workdir, "e")  # the id is free again
    assert exp2 is not exp


async def test_real_request_holds_a_reference(host: Host, workdir: Path) -> None:
    # a read that takes 1.5 s in the backend is a request in flight
    await null_node(host, latency_ns=1_500_000_000)
    exp = await add(host, workdir, "slow")
    mnt = workdir / "slow.raw"

    def slow_read() -> bytes:
        with open(mnt, "rb") as f:
            return f.read(4096)

    reader = asyncio.ensure_future(athread(slow_read))
    for _ in range(100):
        if exp.refcount > 1:
            break
        await asyncio.sleep(0.02)
    assert exp.refcount > 1
    with pytest.raises(QMPError, match=r"^export 'slow' still in use$"):
        host.exports.delete("slow")
    assert await reader == bytes(4096)
    assert exp.refcount == 1
    host.exports.delete("slow")
    await asyncio.wait_for(exp.wait_deleted(), 10)


async def test_hard_delete_cancels_requests_in_flight(host: Host, workdir: Path) -> None:
    await null_node(host, latency_ns=30_000_000_000)  # a backend that hangs
    exp = await add(host, workdir, "hung")
    mnt = workdir / "hung.raw"

    def hung_read() -> str:
        try:
            with open(mnt, "rb") as f:
                f.read(4096)
            return "read"
        except OSError as e:
            return os.strerror(e.errno or 0)

    reader = asyncio.ensure_future(athread(hung_read))
    for _ in range(100):
        if exp.refcount > 1:
            break
        await asyncio.sleep(0.02)
    host.exports.delete("hung", "hard")
    await asyncio.wait_for(exp.wait_deleted(), 10)
    assert await asyncio.wait_for(reader, 10) != "read"
    assert fuse_mounts_under(str(workdir)) == []


async def test_deleted_event_after_unmount_release_and_removal(host: Host, workdir: Path) -> None:
    await null_node(host)
    exp = await add(host, workdir, "e", writable=True)
    node = host.graph.get("null0")
    seen: dict[str, Any] = {}

    def on_event(name: str, data: dict[str, Any]) -> None:
        seen["mounted"] = fuse_mounts_under(str(workdir))
        seen["users"] = [u.parent for u in node.users]
        seen["listed"] = host.exports.find("e")

    host.on_event = on_event
    host.exports.delete("e")
    await asyncio.wait_for(exp.wait_deleted(), 10)
    assert seen == {"mounted": [], "users": [], "listed": None}
    await host.graph.delete("null0")  # nothing holds the node any more


async def test_failed_add_leaves_nothing(host: Host, workdir: Path) -> None:
    await null_node(host)
    node = host.graph.get("null0")
    bad = [
        ({"mountpoint": str(workdir / "missing")}, f"Failed to stat '{workdir / 'missing'}': No such file or directory"),
        ({"mountpoint": str(workdir)}, f"'{workdir}' is not a regular file"),
        ({"mountpoint": str(workdir / "m"), "passthrough": "on"}, None),
    ]
    (workdir / "m").touch()
    for opts, text in bad:
        with pytest.raises(QMPError) as err:
            await host.exports.add({"type": "fuse", "id": "x", "node-name": "null0", **opts})
        if text is not None:
            assert err.value.desc == text
        assert host.exports.query() == []
        assert host.exports.claims == {}
        assert node.users == []
        assert fuse_mounts_under(str(workdir)) == []
    with pytest.raises(QMPError, match=r"^Cannot find device='' nor node-name='nope'$"):
        await host.exports.add({"type": "fuse", "id": "x", "node-name": "nope", "mountpoint": "/x"})
    with pytest.raises(QMPError, match=r"^Invalid block export id$"):
        await host.exports.add({"type": "fuse", "id": "1x", "node-name": "null0", "mountpoint": "/x"})
    await host.graph.add({"driver": "null-co", "node-name": "ro", "read-only": True})
    with pytest.raises(QMPError, match=r"^Cannot export read-only node as writable$"):
        await host.exports.add(
            {"type": "fuse", "id": "x", "node-name": "ro", "mountpoint": "/x", "writable": True}
        )
    assert host.events == []


async def test_same_mountpoint_other_spellings(host: Host, workdir: Path) -> None:
    """QEMU deadlocks on `mnt.raw` vs `/abs/mnt.raw`; exportd answers."""
    await null_node(host)
    await add(host, workdir, "e")
    mnt = workdir / "e.raw"
    (workdir / "sub").mkdir()
    (workdir / "link").symlink_to(workdir)
    (workdir / "alias.raw").symlink_to(mnt)
    spellings = [
        str(mnt),
        os.path.relpath(mnt),
        str(workdir / "sub" / ".." / "e.raw"),
        str(workdir / "link" / "e.raw"),
        str(workdir) + "//e.raw",
        str(workdir / "alias.raw"),  # mount(2) would follow it onto e.raw
    ]
    for spelling in spellings:
        with pytest.raises(QMPError) as err:
            await asyncio.wait_for(
                host.exports.add(
                    {"type": "fuse", "id": "dup", "node-name": "null0", "mountpoint": spelling}
                ),
                20,
            )
        assert err.value.desc == f"There already is a FUSE export on '{spelling}'"
    assert [e["id"] for e in host.exports.query()] == ["e"]


async def test_newest_first_and_shutdown_all(host: Host, workdir: Path) -> None:
    await null_node(host)
    for name in ("a", "b", "c"):
        await add(host, workdir, name)
    assert [e["id"] for e in host.exports.query()] == ["c", "b", "a"]
    assert len(fuse_mounts_under(str(workdir))) == 3
    await host.exports.shutdown_all()
    assert sorted(d["id"] for _, d in host.events) == ["a", "b", "c"]
    assert all(name == "BLOCK_EXPORT_DELETED" for name, _ in host.events)
    assert fuse_mounts_under(str(workdir)) == []
    assert host.graph.get("null0").users == []


async def test_unmounted_from_outside(host: Host, workdir: Path) -> None:
    await null_node(host)
    exp = await add(host, workdir, "e")
    r = await asyncio.to_thread(
        subprocess.run, ["umount", "-l", str(workdir / "e.raw")], capture_output=True
    )
    assert r.returncode == 0, r.stderr
    await asyncio.wait_for(exp.wait_deleted(), 10)
    assert host.events == [("BLOCK_EXPORT_DELETED", {"id": "e"})]
    assert host.exports.query() == []


async def test_hard_delete_lets_a_write_in_flight_land_first(
    host: Host, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write may already run in a worker thread, where nothing can stop
    # it: BLOCK_EXPORT_DELETED must not be sent before it has landed.
    await null_node(host, latency_ns=400_000_000)
    exp = await add(host, workdir, "w", writable=True)
    node = host.graph.get("null0")
    real_write = node.write
    order: list[str] = []

    async def write_and_note(offset: int, data, **kw):  # noqa: ANN001, ANN003, ANN202
        await real_write(offset, data, **kw)
        order.append("write landed")

    monkeypatch.setattr(node, "write", write_and_note)
    host.on_event = lambda name, data: order.append(name)
    mnt = workdir / "w.raw"

    def write() -> None:
        try:
            fd = os.open(mnt, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
        except OSError:
            pass  # the writer may see the mount go away

    writer = asyncio.ensure_future(athread(write))
    for _ in range(100):
        if exp.refcount > 1:
            break
        await asyncio.sleep(0.02)
    assert exp.refcount > 1, "the write never reached the export"
    host.exports.delete("w", "hard")
    await asyncio.wait_for(exp.wait_deleted(), 10)
    await asyncio.wait_for(writer, 10)
    assert order == ["write landed", "BLOCK_EXPORT_DELETED"]
