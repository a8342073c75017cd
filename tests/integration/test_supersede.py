"""Supersede by topic and cancel, through functions-framework's app on real Postgres."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.config import Settings
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.constants import SCHEDULE_DATA as DATA
from tests.support.factories import make_user, row, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock


@pytest.fixture
def client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


def body(user: uuid.UUID, content: str, **fields: Any) -> dict[str, Any]:
    return {"userId": str(user), "agentId": "concierge_agent", "messageData": {"content": content}, **fields}


def test_a_newer_message_on_a_topic_supersedes_the_agents_older_queued_ones(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    other_user = make_user(store)
    old = client.post("/", json=body(user, "Your match is Sam", topicKey="match")).get_json()
    unrelated = client.post("/", json=body(user, "Weekly digest", topicKey="digest")).get_json()
    another_agents = client.post(
        "/", json={**body(user, "From the bouncer", topicKey="match"), "agentId": "bouncer_agent"}
    ).get_json()
    other_users = client.post("/", json=body(other_user, "Your match", topicKey="match")).get_json()

    resp = client.post("/", json=body(user, "Update: your match is Alex", topicKey="match"))

    assert resp.status_code == 201
    new = resp.get_json()
    assert new["superseded"] == [old["messageId"]] and new["topicKey"] == "match"
    r = row(database_url, uuid.UUID(old["messageId"]))
    assert r["status"] == "superseded" and r["superseded_by_message_id"] == new["messageId"]
    assert "topic" in r["superseded_reason"]
    for kept in (unrelated, another_agents, other_users):
        assert row(database_url, uuid.UUID(kept["messageId"]))["status"] == "queued"
    state = client.get(f"/messages/{old['messageId']}").get_json()
    assert state["status"] == "superseded" and state["supersededBy"] == new["messageId"]
    events = sql(
        database_url,
        "select payload from events_outbox where event_type = 'message.superseded'",
    )
    assert [e[0]["messageId"] for e in events] == [old["messageId"]]


def test_a_superseded_message_is_never_sent(
    client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender
) -> None:
    from shared import service

    user = make_user(store)
    old = client.post("/", json=body(user, "old", topicKey="t")).get_json()
    client.post("/", json=body(user, "new", topicKey="t"))
    outcome = service.deliver(
        {"messageId": old["messageId"], "generation": 0},
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=service.Policy(limits=Settings().limits),
        clock=VirtualClock(T0),
    )
    assert (outcome.action, outcome.reason) == ("skipped", "already_superseded")


def test_an_agent_cancels_a_queued_message_once(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    created = client.post("/", json=body(user, "to be withdrawn")).get_json()
    mid = created["messageId"]

    resp = client.post(
        f"/messages/{mid}/cancel", json={"agentId": "concierge_agent", "reason": "user booked"}
    )
    assert resp.status_code == 200
    answer = resp.get_json()
    assert answer["status"] == "cancelled" and answer["alreadyCancelled"] is False
    again = client.post(f"/messages/{mid}/cancel")
    assert again.status_code == 200 and again.get_json()["alreadyCancelled"] is True
    r = row(database_url, uuid.UUID(mid))
    assert r["status"] == "cancelled" and r["last_error"] == "user booked"
    events = sql(database_url, "select payload from events_outbox where event_type = 'message.cancelled'")
    assert [e[0]["messageId"] for e in events] == [mid]


def test_cancel_refuses_what_it_cannot_do(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    mid = client.post("/", json=body(user, "x")).get_json()["messageId"]

    not_mine = client.post(f"/messages/{mid}/cancel", json={"agentId": "someone_else"})
    assert not_mine.status_code == 403 and not_mine.get_json()["error"] == "forbidden"
    missing = client.post(f"/messages/{uuid.uuid4()}/cancel")
    assert missing.status_code == 404 and missing.get_json()["field"] == "messageId"
    bad_id = client.post("/messages/not-a-uuid/cancel")
    assert bad_id.status_code == 400 and bad_id.get_json()["errors"][0]["field"] == "messageId"
    bad_body = client.post(f"/messages/{mid}/cancel", json={"agentId": "a", "colour": 1})
    assert bad_body.status_code == 400 and bad_body.get_json()["errors"][0]["field"] == "colour"
    assert row(database_url, uuid.UUID(mid))["status"] == "queued"

    sql(database_url, "update message_queue set status = 'sent', sent_at = now() where id = %s", mid)
    final = client.post(f"/messages/{mid}/cancel")
    assert final.status_code == 409
    assert final.get_json()["error"] == "not_cancellable" and final.get_json()["status"] == "sent"


def test_a_sequence_over_http(client: FlaskClient, store: PostgresStore) -> None:
    user = make_user(store)
    payload = json.loads((DATA / "sequence.json").read_text().replace("{userId}", str(user)))
    resp = client.post("/", json=payload)
    assert resp.status_code == 201, resp.get_json()
    answer = resp.get_json()
    assert answer["parts"] == 3 and answer["topicKey"] == "intro-sam"
    state = client.get(f"/messages/{answer['messageId']}").get_json()
    assert [p["content"] for p in state["parts"]] == [p["content"] for p in payload["sequence"]]
    assert [p["status"] for p in state["parts"]] == ["pending"] * 3


def test_a_superseding_message_takes_the_place_of_the_one_it_replaces(
    client: FlaskClient, store: PostgresStore
) -> None:
    """Its plan does not count the messages it replaces as still queued: weather v2 gets v1's slot,
    not the one after it, and another agent's later message does not take v1's freed slot first."""
    user = make_user(store)
    first = client.post("/", json=body(user, "hello")).get_json()  # T0
    v1 = client.post("/", json=body(user, "Rain at 6", topicKey="weather")).get_json()  # after the cooldown
    assert (first["scheduledFor"], v1["scheduledFor"]) == (
        "2025-06-02T15:00:00.000Z",
        "2025-06-02T15:00:30.000Z",
    )
    v2 = client.post("/", json=body(user, "Rain at 7", topicKey="weather")).get_json()
    assert v2["superseded"] == [v1["messageId"]]
    assert (v2["scheduledFor"], v2["reason"], v2["blockedBy"]) == (
        v1["scheduledFor"],
        "cooldown",
        ["cooldown"],
    )
