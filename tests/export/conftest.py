"""Fixtures for the FUSE export tests: a real exportd process driven over QMP
with the qemu.qmp library, real mounts, real tools (stat, dd, qemu-img...).

Every syscall on a mount happens in this test process or a child process,
never in the daemon. Every mount made under a test's directory is lazily
unmounted in teardown even if the daemon died or the test failed.

workdir, exportd   from tests.support.export_fixtures
host               an in-process tests.support.host.Host, torn down after
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)
from tests.support.host import Host


@pytest.fixture
async def host(workdir: Path):  # noqa: ANN201, F811
    """An in-process ExportTable and BlockGraph, torn down after."""
    h = Host()
    try:
        yield h
    finally:
        await h.exports.shutdown_all()
        await h.graph.close_all()
