"""Exporting qcow2 images through a real exportd over QMP, and reading
SEEK_DATA/SEEK_HOLE and `qemu-img map` as lists of data extents."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.support.daemon import Exportd
from tests.support.programs import arun
from tests.support.threads import athread

FILEOPS = Path(__file__).with_name("fileops.py")


async def export_qcow2(d: Exportd, img: Path, mnt: Path, *, writable: bool, node: str = "q",
                       export_id: str = "e", export_opts: dict[str, Any] | None = None,
                       **node_opts: Any) -> None:
    """blockdev-add a qcow2 node over `img` (backing chain from the header) and
    mount it on the regular file `mnt`."""
    mnt.touch()
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": node,
                            "file": {"driver": "file", "filename": str(img)}}
    if not writable:
        opts["read-only"] = True
    opts.update(node_opts)
    await d.cmd("blockdev-add", opts)
    await d.add_export(export_id, node, mnt, writable=writable, **(export_opts or {}))


async def unexport(d: Exportd, node: str = "q", export_id: str = "e") -> None:
    """Remove the export, then close the node (flushes and drops the image locks,
    so qemu-img may open the image)."""
    await d.del_export(export_id)
    await d.cmd("blockdev-del", {"node-name": node})


async def read_mount(mnt: Path) -> bytes:
    return await athread(mnt.read_bytes)


async def fileops(path: Path, seed: str, count: int, target: str) -> None:
    """Seeded random writes/punches/zeroes in a child process (see fileops.py)."""
    r = await arun([sys.executable, str(FILEOPS), str(path), seed, str(count), target], timeout=90)
    assert r.returncode == 0, f"fileops on {path} ({target}) failed: {r.stdout}{r.stderr}"


async def qemu_img(*args: str) -> str:
    r = await arun(["qemu-img", *args], timeout=90)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


async def check_clean(img: Path) -> None:
    r = await arun(["qemu-img", "check", "--output=json", str(img)], timeout=90)
    assert r.returncode == 0, f"qemu-img check {img}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("check-errors"), info


async def compare_raw(img: Path, ref: Path) -> None:
    out = await qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(ref))
    assert "Images are identical." in out, out


async def check_matches_model(
    img: Path, workdir: Path, model: bytes | bytearray, snaps: dict[str, bytes] | None = None
) -> None:
    """qemu-img check clean, the image equal to `model`, every snapshot as before."""
    await check_clean(img)
    ref = workdir / "model.raw"
    ref.write_bytes(model)
    await compare_raw(img, ref)
    for s, before in (snaps or {}).items():
        assert await convert_raw(img, workdir / f"{s}-after.raw", snapshot=s) == before, s


async def convert_raw(img: Path, out: Path, snapshot: str | None = None) -> bytes:
    args = ["convert", "-O", "raw"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    await qemu_img(*args, str(img), str(out))
    return out.read_bytes()


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(extents):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


async def qemu_data_extents(img: Path, *, force_share: bool = False) -> list[tuple[int, int]]:
    """[start, end) ranges `qemu-img map` reports as data (whole chain); with
    force_share (-U) while the daemon has the image open (after a flush)."""
    qmap = json.loads(await qemu_img("map", *(["-U"] if force_share else []), "--output=json", str(img)))
    return merge([(e["start"], e["start"] + e["length"]) for e in qmap if e["data"]])


def seek_extents(path: Path) -> list[tuple[int, int]]:
    """Data ranges of a file found by walking SEEK_DATA/SEEK_HOLE (run in a thread)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert start < end <= size, (pos, start, end, size)
            out.append((start, end))
            pos = end
        return merge(out)
    finally:
        os.close(fd)


def seek_at(path: Path, offsets: list[int]) -> list[tuple[int | str, int | str]]:
    """(SEEK_DATA, SEEK_HOLE) results at each offset; 'ENXIO' where refused."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out: list[tuple[int | str, int | str]] = []
        for off in offsets:
            pair: list[int | str] = []
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    pair.append(os.lseek(fd, off, whence))
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    pair.append("ENXIO")
            out.append((pair[0], pair[1]))
        return out
    finally:
        os.close(fd)


def expected_seek(extents: list[tuple[int, int]], size: int, off: int) -> tuple[int | str, int | str]:
    """What lseek must answer at `off` for an export of `size` with these data
    ranges. At exactly EOF, SEEK_HOLE answers EOF (as QEMU's FUSE export and the
    README say; local file systems give ENXIO there)."""
    if off == size:
        return ("ENXIO", size)
    if off > size:
        return ("ENXIO", "ENXIO")
    for s, e in extents:
        if e > off:
            return (off, e) if s <= off else (s, off)
    return ("ENXIO", off)
