"""Fixtures for the nbd driver's tests: real NBD servers (qemu-nbd, nbdkit,
qemu-storage-daemon's NBD export) on UNIX sockets in the test's directory,
and the exportd / workdir fixtures of the export tests.

Every server a test starts is stopped by pid at teardown (Peer.stop)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)
from tests.support.host import Host
from tests.support.nbdpeer import Peer


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """A list to append started Peers to; each is stopped at teardown. Tests
    name it first so that it is set up first and torn down last, after the
    clients (a server with a client still connected is slow to stop)."""
    started: list[Peer] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def sock(workdir: Path) -> str:  # noqa: F811
    return str(workdir / "nbd.sock")


@pytest.fixture
async def graph_host() -> AsyncIterator[Host]:
    """A BlockGraph on the test's loop (no daemon), closed at the end."""
    h = Host()
    try:
        yield h
    finally:
        await h.graph.close_all()
