"""Fixtures for the NBD server tests: a real exportd with its NBD server on
a UNIX socket in the test's directory, and real clients (qemu-img, qemu-io,
nbdinfo, nbdcopy, python3-libnbd under the system python).

workdir, exportd   from tests.support.export_fixtures (stopped after)
nbd                exportd with nbd-server-start done; .sock, .uri(name)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.nbd.tools import NbdDaemon
from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)


@pytest.fixture
async def nbd(exportd, workdir: Path) -> AsyncIterator[NbdDaemon]:  # noqa: F811
    d = NbdDaemon(exportd, workdir / "nbd.sock")
    await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d.sock)}}})
    yield d
