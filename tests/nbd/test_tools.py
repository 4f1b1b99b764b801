"""Real NBD clients against exportd's NBD server: qemu-img, qemu-io,
nbdinfo, nbdcopy, over a UNIX socket and loopback TCP."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.nbd.tools import chain_images, nbdinfo_json, qemu_img_create, qemu_io, run


async def test_qemu_img_and_qemu_io_over_unix(nbd, workdir: Path) -> None:
    _, top = chain_images(workdir)
    await nbd.qcow2("top", top)
    await nbd.export("e0", "top", name="disk", writable=True)
    uri = nbd.uri("disk")
    info = (await run("qemu-img", "info", uri)).stdout
    assert "virtual size: 64 MiB (67108864 bytes)" in info
    out = (await run("qemu-io", "-f", "raw", "-c", "read -P 0xaa 0 1M", "-c", "read -P 0 1M 1M",
                     "-c", "read -P 0xbb 2M 1M", "-c", "read -P 0x22 4M 512k", "-c", "read -P 0x11 4608k 512k",
                     "-c", "read -P 0 8M 1M", "-c", "write -P 0x5c 10M 100k", "-c", "read -P 0x5c 10M 100k",
                     "-c", "write -z 2M 4k", "-c", "read -P 0 2M 4k", "-c", "discard 12M 1M", "-c", "flush",
                     uri)).stdout
    assert "Pattern verification failed" not in out
    copy = workdir / "copy.raw"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy))
    await nbd.d.cmd("block-export-del", {"id": "e0"})
    await nbd.d.event("BLOCK_EXPORT_DELETED")
    await nbd.d.cmd("blockdev-del", {"node-name": "top"})
    await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(copy), str(top))
    assert "Pattern verification failed" not in qemu_io(top, "read -P 0x5c 10M 100k")


async def test_tcp_loopback_convert_in_and_compare(exportd, workdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await exportd.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                               "port": str(port)}}})
    img = workdir / "t.qcow2"
    qemu_img_create(img, "16M")
    await exportd.cmd("blockdev-add", {"driver": "qcow2", "node-name": "t",
                                       "file": {"driver": "file", "filename": str(img)}})
    await exportd.cmd("block-export-add", {"type": "nbd", "id": "t", "node-name": "t", "writable": True})
    src = workdir / "src.raw"
    qemu_img_create(src, "16M", fmt="raw")
    qemu_io(src, "write -P 0x42 1M 3M", "write -P 0x43 9M 64k", fmt="raw")
    uri = f"nbd://127.0.0.1:{port}/t"
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    await exportd.cmd("nbd-server-stop")
    assert (await exportd.event("BLOCK_EXPORT_DELETED")) == {"id": "t"}
    assert await exportd.cmd("query-block-exports") == []


async def test_nbdinfo_list_map_json(nbd, workdir: Path) -> None:
    _, top = chain_images(workdir)
    await nbd.qcow2("top", top, **{"read-only": True})
    await nbd.export("e0", "top", name="disk", description="the disk", **{"allocation-depth": True})
    await nbd.export("e1", "top", name="other")
    listing = (await run("nbdinfo", "--list", nbd.uri())).stdout
    assert 'export="disk"' in listing and 'export="other"' in listing and "the disk" in listing
    info = await nbdinfo_json(nbd.uri("disk"))
    e = info["exports"][0]
    assert e["export-size"] == 64 << 20 and e["is_read_only"] and e["can_multi_conn"]
    assert e["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    assert not e["can_trim"] and not e["can_zero"]
    m = (await run("nbdinfo", "--map", nbd.uri("disk"))).stdout.split("\n")
    rows = [tuple(line.split()[:3]) for line in m if line.strip()]
    assert rows[:4] == [("0", "1048576", "0"), ("1048576", "1048576", "3"), ("2097152", "1048576", "0"),
                        ("3145728", "1048576", "3")]
    d = (await run("nbdinfo", "--map=qemu:allocation-depth", nbd.uri("disk"))).stdout
    assert "backing depth 2" in d and "local" in d and "absent" in d
    # "other" has no allocation-depth context
    assert (await nbdinfo_json(nbd.uri("other")))["exports"][0]["contexts"] == ["base:allocation"]
    bad = await run("nbdinfo", nbd.uri("nope"), check=False)
    assert bad.returncode != 0 and "No such file or directory for export: nope" in bad.stderr


async def test_nbdcopy_out_and_in(nbd, workdir: Path) -> None:
    src = workdir / "src.raw"
    qemu_img_create(src, "32M", fmt="raw")
    qemu_io(src, "write -P 0x61 0 5M", "write -P 0x62 20M 7M", fmt="raw")
    img = workdir / "dst.qcow2"
    qemu_img_create(img, "32M")
    await nbd.qcow2("dst", img)
    await nbd.export("dst", "dst", writable=True)
    await run("nbdcopy", str(src), nbd.uri("dst"))
    out = workdir / "out.raw"
    await run("nbdcopy", nbd.uri("dst"), str(out))
    assert out.read_bytes() == src.read_bytes()
    # holes stayed holes: nbdcopy zeroed rather than wrote the empty parts
    m = (await run("nbdinfo", "--map", nbd.uri("dst"))).stdout
    assert "hole" in m


async def test_a_hole_made_elsewhere_shows_at_once(nbd, workdir: Path) -> None:
    # export "a" remembers that the whole image is data; a trim through
    # another export of the same node must not leave that answer stale
    src = workdir / "d.raw"
    qemu_img_create(src, "4M", fmt="raw")
    qemu_io(src, "write -P 0x61 0 4M", fmt="raw")
    await nbd.d.cmd("blockdev-add", {"driver": "raw", "node-name": "d", "discard": "unmap",
                                     "file": {"driver": "file", "filename": str(src), "discard": "unmap"}})
    await nbd.export("a", "d", name="a")
    await nbd.export("b", "d", name="b", writable=True)

    async def map_of_a() -> list[tuple[str, ...]]:
        out = (await run("nbdinfo", "--map", nbd.uri("a"))).stdout
        return [tuple(line.split()[:3]) for line in out.splitlines() if line.strip()]

    assert await map_of_a() == [("0", "4194304", "0")]
    await run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", nbd.uri("b"))
    assert await map_of_a() == [("0", "1048576", "0"), ("1048576", "1048576", "3"), ("2097152", "2097152", "0")]
