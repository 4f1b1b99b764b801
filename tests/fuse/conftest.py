"""Shared fixtures for the FUSE protocol layer tests.

Every mount made here is unmounted in `finally`; a last-resort fixture
lazily detaches any exportd mount left under this test's directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator

import pytest

from exportd.fuse import mount as fuse_mount
from exportd.fuse.filesystem import SingleFileFS
from exportd.fuse.session import FuseSession


@pytest.fixture(scope="session", autouse=True)
def dev_fuse_open_to_all() -> None:
    """fusermount3 needs /dev/fuse 0666 for non-root users (Debian's udev default)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode != 0o666 and os.geteuid() == 0:
        os.chmod("/dev/fuse", 0o666)


def _leftover_mounts(root: str) -> list[str]:
    return [
        m.mountpoint for m in fuse_mount.exportd_mounts() if m.mountpoint.startswith(root + os.sep)
    ]


@pytest.fixture
def workdir(tmp_path):
    """The test's directory; exportd mounts left inside are detached at the end."""
    yield tmp_path
    for mp in sorted(set(_leftover_mounts(str(tmp_path))), reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
    assert not _leftover_mounts(str(tmp_path)), "mounts left behind"


@pytest.fixture
def target(workdir) -> str:
    """An empty regular file to mount over."""
    path = workdir / "export.img"
    path.write_bytes(b"")
    return str(path)


@contextlib.asynccontextmanager
async def serving(fs: SingleFileFS, mountpoint: str, **kw) -> AsyncIterator[FuseSession]:
    kw.setdefault("fsname", "exportd:test")
    session = await FuseSession.start(fs, mountpoint, **kw)
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
def public_target():
    """A target file in a directory every user can traverse (tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="exportd-fuse-public-", dir="/tmp")
    os.chmod(d, 0o755)
    path = os.path.join(d, "export.img")
    open(path, "wb").close()
    try:
        yield path
    finally:
        for mp in _leftover_mounts(d):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
