"""Fixtures for the TLS and object tests.

pki          a CA with server and client certificates (openssl), per module
other_pki    a second, unrelated CA with its own certificates
creds        {"server": dir, "client": dir}: QEMU's layout of `pki` for each endpoint
workdir      from tests.support.export_fixtures (exportd runs in it)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.export_fixtures import workdir  # noqa: F401  (fixture)
from tests.tls.certs import Pki, creds_dir, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("otherpki"), name="Other CA")


@pytest.fixture
def creds(tmp_path: Path, pki: Pki) -> dict[str, Path]:
    return {"server": creds_dir(tmp_path / "server", pki, client=False),
            "client": creds_dir(tmp_path / "client", pki, server=False)}
