"""Fixtures for the job tests (JobClient: tests.support.qmp)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.qmp import JobClient


@pytest.fixture
async def jobs_client(qmp):
    async def connect(target: Any) -> JobClient:
        return JobClient(await qmp(target))

    return connect
