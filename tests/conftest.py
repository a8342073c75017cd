from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.pubsub_fixtures import pubsub_emulator
from tests.integration.sms_fixtures import sms_sink, twilio_client, twilio_sender
from tests.integration.tasks_fixtures import tasks_client, tasks_emulator
from tests.support.pg import PgCluster

__all__ = [
    "database_url",
    "pg_cluster",
    "pubsub_emulator",
    "sms_sink",
    "tasks_client",
    "tasks_emulator",
    "twilio_client",
    "twilio_sender",
]


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    cluster = PgCluster(tmp_path_factory.mktemp("pg") / "data")
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    with pg_cluster.fresh_database() as url:
        yield url
