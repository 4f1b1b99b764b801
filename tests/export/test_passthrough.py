"""passthrough=auto|on|off (an exportd extension): a raw export of a plain
file can let the kernel serve read/write itself (FUSE_PASSTHROUGH, kernel
>= 6.9, CAP_SYS_ADMIN). query-block-exports tells which mode is in use."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exportd.export.fuse import FuseExport
from tests.support.daemon import Exportd
from tests.support.host import Host, add
from tests.support.images import make_image
from tests.support.programs import arun
from tests.support.threads import athread


def kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return os.geteuid() == 0 and (major, minor) >= (6, 9)


needs_passthrough = pytest.mark.skipif(
    not kernel_has_passthrough(), reason="FUSE passthrough needs kernel >= 6.9 and root"
)


async def passthrough_of(d: Exportd, export_id: str) -> bool:
    return next(e for e in await d.exports() if e["id"] == export_id)["passthrough"]


@needs_passthrough
async def test_modes_over_qmp(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    img = workdir / "img.raw"
    data = make_image(img, 1 << 20)
    await d.blockdev_file("f", img)
    await d.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    await d.cmd("blockdev-add", {"driver": "raw", "node-name": "win", "file": "f", "offset": 4096})
    await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "n"})
    for i in range(8):
        (workdir / f"m{i}").touch()

    # read-only raw export of a plain file: passthrough by default
    await d.add_export("ro-file", "f", workdir / "m0")
    await d.add_export("ro-raw", "r", workdir / "m1")
    assert await passthrough_of(d, "ro-file") and await passthrough_of(d, "ro-raw")
    assert await athread((workdir / "m1").read_bytes) == data
    # off: the daemon serves
    await d.add_export("off", "f", workdir / "m2", passthrough="off")
    assert not await passthrough_of(d, "off")
    assert await athread((workdir / "m2").read_bytes) == data
    # auto falls back silently for a window, another driver, or a writable
    # export whose size the kernel could not keep
    await d.add_export("window", "win", workdir / "m3")
    await d.add_export("null", "n", workdir / "m4")
    await d.add_export("rw", "f", workdir / "m5", writable=True)
    for export_id in ("window", "null", "rw"):
        assert not await passthrough_of(d, export_id)
    assert await athread((workdir / "m3").read_bytes) == data[4096:]
    # on fails instead, with the reason
    for export_id, node in (("x1", "win"), ("x2", "n")):
        desc = await d.error(
            "block-export-add",
            {"type": "fuse", "id": export_id, "node-name": node, "mountpoint": str(workdir / "m6"),
             "passthrough": "on"},
        )
        assert desc.startswith(f"Cannot use passthrough for export '{export_id}': "), desc
    assert len(await d.exports()) == 6


@needs_passthrough
async def test_growable_passthrough_writes(exportd: Exportd, workdir: Path) -> None:
    d = exportd
    img = workdir / "img.raw"
    data = make_image(img, 1 << 20)
    mnt = workdir / "mnt.raw"
    mnt.touch()
    await d.blockdev_file("f", img)
    await d.add_export("g", "f", mnt, writable=True, growable=True, passthrough="on")
    assert await passthrough_of(d, "g")
    r = await arun(["dd", "if=/dev/zero", f"of={mnt}", "bs=64k", "count=2", "seek=16",
                    "conv=notrunc"])
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == (1 << 20) + (128 << 10)
    # the daemon answers stat with the size the kernel's writes made
    assert (await athread(os.stat, mnt)).st_size == img.stat().st_size
    assert img.read_bytes() == data + bytes(128 << 10)
    r = await arun(["truncate", "-s", "4096", str(mnt)])
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == 4096 == (await athread(os.stat, mnt)).st_size


@needs_passthrough
async def test_daemon_sees_no_read_under_passthrough(workdir: Path) -> None:
    host = Host()
    try:
        img = workdir / "img.raw"
        data = make_image(img, 1 << 20)
        await host.graph.add({"driver": "file", "node-name": "null0", "filename": str(img)})
        exp = await add(host, workdir, "pt")
        assert isinstance(exp, FuseExport) and exp.passthrough
        got = await athread((workdir / "pt.raw").read_bytes)
        assert got == data
        counters = exp.session.counters
        assert counters.get("READ", 0) == 0 and counters.get("OPEN", 0) >= 1, counters
        exp2 = await add(host, workdir, "served", passthrough="off")
        assert await athread((workdir / "served.raw").read_bytes) == data
        assert exp2.session.counters.get("READ", 0) > 0
    finally:
        await asyncio.wait_for(host.exports.shutdown_all(), 20)
        await host.graph.close_all()
