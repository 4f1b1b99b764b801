"""Shared fixtures for the FUSE protocol layer tests (helpers: tests.support.fuse).

Every mount made here is unmounted in `finally`; a last-resort fixture
lazily detaches any exportd mount left under this test's directories.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest

from tests.support.mounts import exportd_mounts_under, lazy_unmount_exportd_mounts


@pytest.fixture(scope="session", autouse=True)
def dev_fuse_open_to_all() -> None:
    """fusermount3 needs /dev/fuse 0666 for non-root users (Debian's udev default)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode != 0o666 and os.geteuid() == 0:
        os.chmod("/dev/fuse", 0o666)


@pytest.fixture
def workdir(tmp_path):
    """The test's directory; exportd mounts left inside are detached at the end."""
    yield tmp_path
    lazy_unmount_exportd_mounts(str(tmp_path))
    assert not exportd_mounts_under(str(tmp_path)), "mounts left behind"


@pytest.fixture
def target(workdir) -> str:
    """An empty regular file to mount over."""
    path = workdir / "export.img"
    path.write_bytes(b"")
    return str(path)


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
        lazy_unmount_exportd_mounts(d)
        shutil.rmtree(d, ignore_errors=True)
