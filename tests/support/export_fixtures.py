"""Fixtures for tests of FUSE exports served by a real exportd process,
shared by tests/export and tests/qcow2_export (their conftest.py files
import them):

workdir   a directory every user can traverse (tests run tools as `nobody`
          too), with the lazy-unmount safety net for anything mounted below it
exportd   a started tests.support.daemon.Exportd in workdir, stopped after
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.mounts import lazy_unmount_all


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every user can traverse (tests run tools as `nobody` too),
    with the lazy-unmount safety net for anything mounted below it."""
    d = Path(tempfile.mkdtemp(prefix="exportd-export-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        lazy_unmount_all(str(d))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def exportd(workdir: Path) -> AsyncIterator[Exportd]:
    d = Exportd(workdir)
    try:
        await d.start()  # inside the try: a failed start still stops the process
        yield d
    finally:
        await d.stop()
        lazy_unmount_all(str(workdir))
