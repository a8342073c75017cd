"""Fixtures the integration modules share (the session ones, the database and the emulators, are in
tests/conftest.py). A module that needs another variant overrides one by name: `store_pool_size`
for a bigger pool, `container_settings` for other settings, `store` itself for another store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shared import bootstrap
from shared.config import Settings
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import T0
from tests.support.fake_anthropic import FakeAnthropic
from tests.support.fakes import RecordingTaskQueue, VirtualClock


@pytest.fixture
def store_pool_size() -> int | None:
    """`store`'s connection pool size; None is PostgresStore's default. Modules whose tests deliver
    on several threads at once override it."""
    return None


@pytest.fixture
def store(database_url: str, store_pool_size: int | None) -> Iterator[PostgresStore]:
    """A PostgresStore on the test's fresh database, closed after the test."""
    if store_pool_size is None:
        s = PostgresStore(database_url)
    else:
        s = PostgresStore(database_url, max_size=store_pool_size)
    yield s
    s.close()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection to look at (and occasionally arrange) the rows behind the store."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def tasks() -> RecordingTaskQueue:
    """Cloud Tasks, recorded in-process."""
    return RecordingTaskQueue()


@pytest.fixture
def clock() -> VirtualClock:
    """A virtual clock at T0."""
    return VirtualClock(T0)


@pytest.fixture
def container_settings() -> Settings:
    """The settings `container` is built with."""
    return Settings()


@pytest.fixture
def container(
    container_settings: Settings,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    clock: VirtualClock,
) -> Iterator[bootstrap.Container]:
    """The functions' adapters for this test (the store, the recorded tasks, the real twilio client
    to the SMS sink, the virtual clock), installed for functions/main.py while the test runs."""
    c = bootstrap.Container(container_settings, store=store, tasks=tasks, sms=twilio_sender, clock=clock)
    previous = bootstrap.install(c)
    yield c
    bootstrap.install(previous)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    """A local fake of Anthropic's Messages API (tests/support/fake_anthropic.py)."""
    with FakeAnthropic() as server:
        yield server
