"""Fixtures for the FUSE over io_uring tests (helpers: tests.support.fuse).

The kernel's module parameter is turned on for the session when we are root
(as `make setup` does); without it, and without root to turn it on, the
tests that need the ring are skipped with the reason.
"""

from __future__ import annotations

import os

import pytest

from exportd.fuse import uring
from tests.fuse.conftest import target, workdir  # noqa: F401 - the same fixtures as tests/fuse


@pytest.fixture(scope="session", autouse=True)
def ring_enabled() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if uring.parameter_state() == "N" and os.geteuid() == 0:
        with open(uring.ENABLE_PARAMETER, "w") as f:
            f.write("Y")


@pytest.fixture
def need_ring() -> None:
    reason = uring.unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def parameter_off(need_ring):
    """The module parameter turned off for the test (root only), then back on.
    It is machine-wide: mounts made meanwhile by others would not get the ring."""
    if os.geteuid() != 0:
        pytest.skip("turning the module parameter off needs root")
    with open(uring.ENABLE_PARAMETER, "w") as f:
        f.write("N")
    try:
        yield
    finally:
        with open(uring.ENABLE_PARAMETER, "w") as f:
            f.write("Y")
