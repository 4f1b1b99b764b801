"""Fixtures for the object tests (iothread, secret, throttle-group, the
throttle driver).

workdir, exportd   from tests.support.export_fixtures (exportd runs in workdir)
pki                a CA with server and client certificates (openssl), per module
"""

from __future__ import annotations

import pytest

from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)
from tests.tls.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
