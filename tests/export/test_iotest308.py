"""A port of QEMU's iotest 308 (FUSE exports) to exportd, for raw and qcow2.

Same steps and checks as tests/qemu-iotests/308 in qemu/qemu, driven over QMP
against a real exportd process and checked with stat, chmod, dd, fallocate,
truncate, cp, qemu-img and qemu-io on the mountpoints. The image is 8 MiB
instead of 64 MiB, and the growable dd writes 64 KiB in 512-byte blocks
instead of 1-byte ones, to keep the run short; the behaviour checked is the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.programs import arun, have

pytestmark = [
    pytest.mark.skipif(not have("qemu-img") or not have("qemu-io"), reason="qemu-utils missing"),
]

SIZE = 8 << 20


def have_driver(name: str) -> bool:
    from exportd.block import driver_class

    try:
        return driver_class(name) is not None
    except Exception:  # noqa: BLE001 - a broken driver module counts as missing
        return False


async def make_test_img(fmt: str, img: Path, workdir: Path) -> None:
    """_make_test_img 8M + qemu-io 'write -s <random> 0 8M'."""
    if fmt == "raw":
        make_image(img, SIZE, seed=308)
        return
    r = await arun(["qemu-img", "create", "-f", fmt, str(img), str(SIZE)])
    assert r.returncode == 0, r.stderr
    source = workdir / "random.bin"
    make_image(source, SIZE, seed=308)
    r = await arun(["qemu-io", "-f", fmt, "-c", f"write -s {source} 0 {SIZE}", str(img)])
    assert "wrote" in r.stdout, r.stdout + r.stderr
    source.unlink()


async def setup_nodes(d: Exportd, fmt: str, img: Path) -> None:
    # separate protocol and format nodes, so the format layer can go later
    await d.blockdev_file("node-protocol", img)
    await d.cmd("blockdev-add", {"driver": fmt, "node-name": "node-format", "file": "node-protocol"})


@pytest.mark.parametrize(
    "fmt",
    [
        "raw",
        pytest.param(
            "qcow2",
            marks=pytest.mark.skipif(not have_driver("qcow2"), reason="qcow2 driver not built"),
        ),
    ],
)
async def test_iotest308(exportd: Exportd, workdir: Path, fmt: str) -> None:
    d = exportd
    img = workdir / f"t.{fmt}"
    ext_mp = workdir / f"t.{fmt}.fuse"
    copied = workdir / f"t.{fmt}.copy"
    await make_test_img(fmt, img, workdir)
    await setup_nodes(d, fmt, img)

    # === Mountpoint not present ===
    assert await d.error(
        "block-export-add",
        {"type": "fuse", "id": "export-err", "node-name": "node-format", "mountpoint": str(ext_mp)},
    ) == f"Failed to stat '{ext_mp}': No such file or directory"

    # === Mountpoint is a directory ===
    ext_mp.mkdir()
    assert await d.error(
        "block-export-add",
        {"type": "fuse", "id": "export-err", "node-name": "node-format", "mountpoint": str(ext_mp)},
    ) == f"'{ext_mp}' is not a regular file"
    ext_mp.rmdir()

    # === Mountpoint is a regular file ===
    ext_mp.touch()
    await d.add_export("export-mp", "node-format", ext_mp)
    r = await arun(["qemu-img", "compare", "-f", "raw", "-F", fmt, "-U", str(ext_mp), str(img)])
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr

    r = await arun(["stat", "-c", "%a", str(ext_mp)])
    assert r.stdout.strip() == "400"
    # read-only exports are mounted ro: no chmod at all
    for change in ("u+w", "u+x"):
        r = await arun(["chmod", change, str(ext_mp)])
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
        r = await arun(["stat", "-c", "%a", str(ext_mp)])
        assert r.stdout.strip() == "400"

    # === Mount over existing file ===
    await d.add_export("export-img", "node-format", img)
    # both exports at once: a concurrency check
    r = await arun(["qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", str(ext_mp), str(img)])
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr
    # cp relies on short reads at EOF
    r = await arun(["cp", str(img), str(copied)])
    assert r.returncode == 0, r.stderr
    os.chmod(copied, 0o600)
    assert copied.stat().st_size == SIZE

    # === Double export ===
    assert await d.error(
        "block-export-add",
        {"type": "fuse", "id": "export-err", "node-name": "node-format", "mountpoint": str(ext_mp)},
    ) == f"There already is a FUSE export on '{ext_mp}'"

    # === Remove export ===
    r = await arun(["qemu-img", "info", "-f", "raw", "-U", str(ext_mp)])
    assert f"virtual size: 8 MiB ({SIZE} bytes)" in r.stdout, r.stdout + r.stderr
    await d.del_export("export-mp")
    r = await arun(["qemu-img", "info", "-f", "raw", "-U", str(ext_mp)])
    assert "virtual size: 0 B (0 bytes)" in r.stdout, r.stdout + r.stderr

    # === Writable export ===
    await d.add_export("export-mp", "node-format", ext_mp, writable=True)
    # writing to the read-only export (mounted over the image) fails
    r = await arun(["qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", str(img)])
    out = r.stdout + r.stderr
    assert "wrote" not in out and (
        "Read-only file system" in out or "Permission denied" in out
    ), out
    # but here it works
    r = await arun(["qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", str(ext_mp)])
    assert "wrote 65536/65536 bytes at offset 1048576" in r.stdout, r.stdout + r.stderr
    r = await arun(["qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", str(copied)])
    assert "wrote 65536/65536 bytes at offset 1048576" in r.stdout

    # === Resizing exports ===
    await d.del_export("export-mp")
    await d.del_export("export-img")
    await d.cmd("blockdev-del", {"node-name": "node-format"})
    await d.add_export("export-mp", "node-protocol", ext_mp, writable=True)

    # --- Try growing non-growable export ---
    orig_len = int((await arun(["stat", "-c", "%s", str(ext_mp)])).stdout)
    assert orig_len == img.stat().st_size
    orig_disk_usage = img.stat().st_blocks
    r = await arun(
        ["dd", "if=/dev/zero", f"of={ext_mp}", "bs=1", "count=64k", f"seek={orig_len}"]
    )
    assert "No space left on device" in r.stderr, r.stderr
    assert "1+0 records in" in r.stderr and "0+0 records out" in r.stderr, r.stderr

    # --- Resize export --- (explicit truncate works, even by fallocate)
    r = await arun(["fallocate", "-o", str(orig_len), "-l", "64k", str(ext_mp)])
    assert r.returncode == 0, r.stderr
    new_len = int((await arun(["stat", "-c", "%s", str(ext_mp)])).stdout)
    assert new_len == img.stat().st_size == orig_len + 65536
    assert img.stat().st_blocks > orig_disk_usage, "disk usage did not grow with fallocate"

    # --- Try growing growable export ---
    await d.del_export("export-mp")
    await d.add_export("export-mp", "node-protocol", ext_mp, writable=True, growable=True)
    r = await arun(
        ["dd", "if=/dev/zero", f"of={ext_mp}", "bs=512", "count=128", f"seek={new_len}", "oflag=seek_bytes",
         "conv=notrunc"]
    )
    assert r.returncode == 0 and "128+0 records out" in r.stderr, r.stderr
    new_len = int((await arun(["stat", "-c", "%s", str(ext_mp)])).stdout)
    assert new_len == img.stat().st_size == orig_len + 131072

    # --- Shrink export ---
    r = await arun(["truncate", "-s", str(orig_len), str(ext_mp)])
    assert r.returncode == 0, r.stderr
    new_len = int((await arun(["stat", "-c", "%s", str(ext_mp)])).stdout)
    assert new_len == img.stat().st_size == orig_len

    # === Tear down ===
    await d.cmd("quit")
    shutdown = await d.event("SHUTDOWN")
    assert shutdown == {"guest": False, "reason": "host-qmp-quit"}
    assert await d.event("BLOCK_EXPORT_DELETED") == {"id": "export-mp"}
    await d.disconnect()
    assert d.proc is not None
    assert d.proc.wait(20) == 0

    # === Compare copy with original ===
    r = await arun(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(copied), str(img)])
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr
    if fmt != "raw":
        r = await arun(["qemu-img", "check", "-f", fmt, str(img)])
        assert r.returncode == 0, r.stdout + r.stderr
