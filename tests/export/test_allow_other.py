"""allow-other on|off|auto, checked as the `nobody` user: without allow_other
the kernel denies every other user; with it, the file's mode decides."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.images import make_image
from tests.support.programs import arun, have

NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(not have("setpriv"), reason="setpriv (util-linux) missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody"),
]


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


async def export(d: Exportd, workdir: Path, allow_other: str) -> tuple[Path, bytes]:
    img = workdir / "img.raw"
    data = make_image(img, 65536)
    mnt = workdir / "mnt.raw"
    mnt.touch()
    mnt.chmod(0o644)
    await d.blockdev_file("f", img)
    # writable: a read-only export is mounted ro, where no chmod can open it up
    await d.add_export("e", "f", mnt, allow_other=allow_other, writable=True)
    return mnt, data


@pytest.mark.parametrize("mode", ["on", "auto"])
async def test_allow_other_lets_nobody_in(exportd: Exportd, workdir: Path, mode: str) -> None:
    mnt, data = await export(exportd, workdir, mode)
    [info] = await exportd.exports()
    assert info["allow-other"] is True  # root may always use allow_other
    # mode 0600 still keeps others out (default_permissions)
    r = await arun(as_nobody("head", "-c", "16", str(mnt)))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    # with allow_other, chmod may open it to others
    r = await arun(["chmod", "0644", str(mnt)])
    assert r.returncode == 0, r.stderr
    r = await arun(as_nobody("sha256sum", str(mnt)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    # ...but not to write; 0666 does
    dd = ["dd", "if=/dev/zero", f"of={mnt}", "bs=512", "count=1", "conv=notrunc"]
    r = await arun(as_nobody(*dd))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    r = await arun(["chmod", "0666", str(mnt)])
    assert r.returncode == 0, r.stderr
    r = await arun(as_nobody(*dd))
    assert r.returncode == 0, r.stderr
    assert (workdir / "img.raw").read_bytes()[:512] == bytes(512)


async def test_allow_other_off_keeps_nobody_out(exportd: Exportd, workdir: Path) -> None:
    mnt, _ = await export(exportd, workdir, "off")
    [info] = await exportd.exports()
    assert info["allow-other"] is False
    r = await arun(as_nobody("head", "-c", "16", str(mnt)))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    r = await arun(as_nobody("stat", str(mnt)))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    # and chmod cannot pretend otherwise
    r = await arun(["chmod", "0444", str(mnt)])
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    # root still reads it
    r = await arun(["sha256sum", str(mnt)])
    assert r.returncode == 0, r.stderr
