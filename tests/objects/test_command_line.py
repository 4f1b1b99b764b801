"""--object iothread / secret / throttle-group at startup, before the
--blockdev and --export that use them (an export naming an iothread, a
throttle node over a group); QEMU's texts when they are wrong."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.programs import arun


async def test_objects_before_the_nodes_and_exports_that_use_them(workdir: Path) -> None:
    img, mnt = workdir / "disk.img", workdir / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    mnt.touch()
    d = Exportd(workdir)
    try:
        await d.start("--object", "iothread,id=io0,poll-max-ns=0,aio-max-batch=8",
                      "--object", "secret,id=s0,data=YWJj,format=base64",
                      "--object", "throttle-group,id=tg,limits.iops-total=100",
                      "--object", '{"qom-type": "throttle-group", "id": "tg2", "x-iops-total": 5}',
                      "--blockdev", f"driver=file,node-name=f,filename={img}",
                      "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=f",
                      "--export", f"type=fuse,id=e,node-name=t,mountpoint={mnt},iothread=io0")
        for oid in ("io0", "s0", "tg", "tg2"):
            assert await d.error("object-add", {"qom-type": "iothread", "id": oid}) == \
                f"attempt to add duplicate property '{oid}' to object (type 'container')"
        assert await d.error("object-del", {"id": "tg"}) == "object 'tg' is in use, can not be deleted"
        # 256 direct reads of 4 KiB at 100 per second, after the first 11
        t0 = time.monotonic()
        r = await arun(["dd", f"if={mnt}", "of=/dev/null", "bs=4k", "iflag=direct"])
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 >= (256 - 11) / 100 * 0.95
        await d.del_export("e")
        await d.cmd("blockdev-del", {"node-name": "t"})
        await d.cmd("object-del", {"id": "tg"})
    finally:
        await d.stop()


@pytest.mark.parametrize(("options", "text"), [
    (["--object", "throttle-group,id=tg,limits.iops-total=-1"],
     "exportd: bps/iops/max values must be within [0, 1000000000000000]"),
    (["--object", "secret,id=s0"], "exportd: Either 'file' or 'data' must be provided"),
    (["--object", "iothread,id=io0,poll-grow=-1"], "exportd: poll-grow value must be in range [0, 9223372036854775807]"),
    (["--blockdev", "driver=null-co,node-name=n", "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=n"],
     "exportd: Throttle group 'tg' does not exist"),
    (["--blockdev", "driver=null-co,node-name=n", "--export", "type=nbd,id=e,node-name=n,iothread=nope"],
     'exportd: iothread "nope" not found'),
])
def test_command_line_errors(tmp_path: Path, options: list[str], text: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "exportd", "--socket", str(tmp_path / "s.sock"), *options],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    # QEMU names the failing option first (the last one given here)
    text = text.replace("exportd: ", f"exportd: {options[-2]} {options[-1]}: ", 1)
    assert proc.stderr.strip().splitlines()[-1] == text
