"""Fixtures for the block layer tests: a BlockGraph on this test's event loop
and image files on the two kinds of file system the file driver treats
differently (a disk file system -> I/O threads, tmpfs -> inline)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _shm_dir() -> Path | None:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(params=["disk", "tmpfs"])
def imgdir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory for images: tmp_path (disk) or a private dir on /dev/shm."""
    if request.param == "disk":
        yield tmp_path
        return
    shm = _shm_dir()
    if shm is None:
        pytest.skip("no writable /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="exportd-block-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
