"""Database round trips per request, through functions-framework's app on real Postgres (issue 7:
at most 2 per schedule and 3 per delivery). `make bench` reports the same counts; here a change
that adds a call to either path fails a test instead of only moving a figure.

Every PostgresStore method is one `select mq_...(...)` in autocommit mode, and the pool checks no
connection on checkout, so the store calls counted here are the round trips."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.factories import make_user
from tests.support.fakes import VirtualClock


class CountingStore(PostgresStore):
    """The real store, recording the SQL function of every call it makes."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(conninfo)
        self.functions: list[str] = []
        self._lock = threading.Lock()

    def call(self, function: str, /, **args: Any) -> Any:
        with self._lock:
            self.functions.append(function)
        return super().call(function, **args)

    def take(self) -> list[str]:
        with self._lock:
            calls, self.functions = self.functions, []
        return calls


@pytest.fixture
def store(database_url: str) -> Iterator[CountingStore]:
    s = CountingStore(database_url)
    yield s
    s.close()


@pytest.fixture
def clients(container: bootstrap.Container) -> tuple[FlaskClient, FlaskClient]:
    """schedule_message's and deliver_message's apps on `container`, whose store is the counting one."""
    return (
        create_app("schedule_message", MAIN).test_client(),
        create_app("deliver_message", MAIN).test_client(),
    )


def _body(user: uuid.UUID, text: str) -> dict[str, Any]:
    return {
        "userId": str(user),
        "agentId": "trips_agent",
        "messageData": {"content": text},
        "priority": "high",
    }


def test_the_pool_checks_no_connection_on_checkout(store: CountingStore) -> None:
    # A check is a `select 1` before every call: it would double the round trips counted below.
    assert store._pool._check is None


def test_a_schedule_costs_two_round_trips_and_a_replay_one(
    store: CountingStore, clients: tuple[FlaskClient, FlaskClient]
) -> None:
    schedule, _ = clients
    user = make_user(store, "America/New_York")
    store.take()
    resp = schedule.post("/", json=_body(user, "first"))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert store.take() == ["mq_user_context", "mq_enqueue"]

    # A deferred one (cooldown) costs the same: planning is in Python, between the two calls.
    resp = schedule.post("/", json=_body(user, "second"))
    assert resp.status_code == 201 and resp.get_json()["reason"] == "cooldown"
    assert len(store.take()) == 2

    keyed = _body(user, "keyed") | {"idempotencyKey": "trip-1"}
    assert schedule.post("/", json=keyed).status_code == 201
    assert len(store.take()) == 2
    replay = schedule.post("/", json=keyed)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    assert store.take() == ["mq_user_context"]


def test_a_delivery_costs_three_round_trips(
    store: CountingStore, clients: tuple[FlaskClient, FlaskClient]
) -> None:
    schedule, deliver = clients
    user = make_user(store)
    message_id = schedule.post("/", json=_body(user, "deliver me")).get_json()["messageId"]
    store.take()
    bootstrap.container().clock = VirtualClock(T0 + timedelta(seconds=1))  # type: ignore[assignment]
    resp = deliver.post("/", json={"messageId": message_id, "generation": 0})
    assert resp.status_code == 200 and resp.get_json()["action"] == "sent", resp.get_data(as_text=True)
    assert store.take() == ["mq_delivery_context", "mq_claim", "mq_record_sent"]

    # The task fired again (Cloud Tasks delivers at least once): answered without sending, and
    # within the same budget.
    again = deliver.post("/", json={"messageId": message_id, "generation": 0})
    assert again.status_code == 200 and again.get_json()["action"] != "sent", again.get_data(as_text=True)
    assert len(store.take()) <= 3
