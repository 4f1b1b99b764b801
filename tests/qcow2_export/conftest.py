"""Fixtures for qcow2 images exported through FUSE by a real exportd process.

Reuses the Exportd driver and unmount safety net of tests/export; images are
built by tests/qcow2/variants.py (qemu-img/qemu-io, the oracles)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.export.conftest import Exportd, lazy_unmount_all


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp; anything mounted below it is lazily
    unmounted at teardown, even after a failure or a dead daemon."""
    d = Path(tempfile.mkdtemp(prefix="exportd-q2x-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        lazy_unmount_all(str(d))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def exportd(workdir: Path) -> AsyncIterator[Exportd]:
    d = Exportd(workdir)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        lazy_unmount_all(str(workdir))
