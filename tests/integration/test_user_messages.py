"""A user's queue, GET schedule_message/users/<userId>/messages, through functions-framework's app
on real Postgres: newest first, filtered, paged by an opaque cursor with no duplicates or gaps, and
only the caller's own agents' messages (CALLER_IDENTITY=header with AGENT_IDENTITIES)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.config import Settings
from shared.identity import IDENTITY_HEADER
from shared.small_requests import LIST_LIMIT_MAX
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN
from tests.support.constants import SCHEDULE_DATA as DATA
from tests.support.factories import make_user
from tests.support.fakes import VirtualClock

CONCIERGE = "concierge@agents.test"
COACH = "coach@agents.test"
OPERATOR = "ops@example.com"
STRANGER = "stranger@agents.test"
IDENTITIES = json.dumps(
    {CONCIERGE: ["concierge_agent"], COACH: ["coach_agent"], OPERATOR: ["*"], STRANGER: ["nobody_agent"]}
)


@pytest.fixture
def container_settings() -> Settings:
    return Settings.from_env({"CALLER_IDENTITY": "header", "AGENT_IDENTITIES": IDENTITIES})


@pytest.fixture
def client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


def as_(who: str) -> dict[str, str]:
    return {IDENTITY_HEADER: who}


def schedule(client: FlaskClient, user: uuid.UUID, agent: str, who: str, **extra: Any) -> str:
    body = json.loads((DATA / "valid.json").read_text().replace("{userId}", str(user)))
    resp = client.post("/", json=body | {"agentId": agent} | extra, headers=as_(who))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json()["messageId"])


def listing(client: FlaskClient, user: uuid.UUID | str, who: str = OPERATOR, **query: Any) -> Any:
    resp = client.get(f"/users/{user}/messages", query_string=query, headers=as_(who))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is True and body["userId"] == str(user)
    return body


@pytest.fixture
def queue(client: FlaskClient, store: PostgresStore, clock: VirtualClock) -> dict[str, Any]:
    """One user with five messages a second apart (two agents, one topic, one cancelled), and
    another user's message that no listing of the first may show."""
    user = make_user(store)
    other = make_user(store)
    ids = []
    for agent, who, extra in [
        ("concierge_agent", CONCIERGE, {"topicKey": "weather"}),
        ("coach_agent", COACH, {}),
        ("concierge_agent", CONCIERGE, {}),
        ("coach_agent", COACH, {"topicKey": "weather"}),
        ("concierge_agent", CONCIERGE, {}),
    ]:
        ids.append(schedule(client, user, agent, who, **extra))
        clock.advance(timedelta(seconds=1))
    cancelled = client.post(f"/messages/{ids[2]}/cancel", headers=as_(CONCIERGE))
    assert cancelled.status_code == 200
    schedule(client, other, "concierge_agent", CONCIERGE)
    return {"user": user, "ids": ids}


def test_an_operator_lists_every_message_newest_first_with_the_message_fields(
    client: FlaskClient, queue: dict[str, Any]
) -> None:
    body = listing(client, queue["user"])
    assert [m["messageId"] for m in body["messages"]] == queue["ids"][::-1]
    assert body["nextCursor"] is None
    newest = body["messages"][0]
    single = client.get(f"/messages/{newest['messageId']}", headers=as_(OPERATOR)).get_json()
    # The same fields GET /messages/<id> answers, without the timeline.
    assert newest == {k: v for k, v in single.items() if k not in ("success", "timeline")}
    assert {m["userId"] for m in body["messages"]} == {str(queue["user"])}


def test_filters_by_status_agent_and_topic_together_or_alone(
    client: FlaskClient, queue: dict[str, Any]
) -> None:
    ids = queue["ids"]

    def found(**query: str) -> list[str]:
        return [m["messageId"] for m in listing(client, queue["user"], **query)["messages"]]

    assert found(status="cancelled") == [ids[2]]
    assert found(status="queued") == [ids[4], ids[3], ids[1], ids[0]]
    assert found(agentId="coach_agent") == [ids[3], ids[1]]
    assert found(topic="weather") == [ids[3], ids[0]]
    assert found(topic="weather", agentId="concierge_agent", status="queued") == [ids[0]]
    assert found(status="sent") == []


def test_pages_follow_the_cursor_without_duplicates_or_gaps(
    client: FlaskClient, store: PostgresStore, queue: dict[str, Any]
) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = listing(client, queue["user"], **query)
        assert len(body["messages"]) <= 2
        seen += [m["messageId"] for m in body["messages"]]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
        # A message scheduled between pages is newer than every page: it shifts nothing.
        schedule(client, queue["user"], "coach_agent", COACH)
    assert pages == 3 and seen == queue["ids"][::-1]
    # An exact fit: the last full page says there is none after it.
    exact = listing(client, queue["user"], limit=2, status="cancelled")
    assert len(exact["messages"]) == 1 and exact["nextCursor"] is None


def test_an_agent_sees_only_its_own_agents_messages(client: FlaskClient, queue: dict[str, Any]) -> None:
    ids = queue["ids"]
    coach = listing(client, queue["user"], COACH)
    assert [m["messageId"] for m in coach["messages"]] == [ids[3], ids[1]]
    concierge = listing(client, queue["user"], CONCIERGE, limit=2)
    assert [m["messageId"] for m in concierge["messages"]] == [ids[4], ids[2]]
    rest = listing(client, queue["user"], CONCIERGE, cursor=concierge["nextCursor"])
    assert [m["messageId"] for m in rest["messages"]] == [ids[0]] and rest["nextCursor"] is None
    # Asking for another agent's messages does not widen what the caller sees.
    assert listing(client, queue["user"], COACH, agentId="concierge_agent")["messages"] == []
    # A caller none of whose agents wrote to the user: an empty list, not someone else's messages.
    assert listing(client, queue["user"], STRANGER)["messages"] == []
    assert listing(client, queue["user"], "unlisted@agents.test")["messages"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"agentId": " "}, "agentId"),
        ({"agentId": "a" * 101}, "agentId"),
        ({"topic": ""}, "topic"),
        ({"topic": "x\x00y"}, "topic"),
        ({"limit": "0"}, "limit"),
        ({"limit": str(LIST_LIMIT_MAX + 1)}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "WyJ4IiwieSJd"}, "cursor"),  # base64 of ["x","y"]: the shape, not the values
        ({"sort": "oldest"}, "sort"),
    ],
)
def test_bad_query_parameters_answer_400_naming_the_field(
    client: FlaskClient, store: PostgresStore, query: dict[str, str], field: str
) -> None:
    resp = client.get(f"/users/{make_user(store)}/messages", query_string=query, headers=as_(OPERATOR))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"] == "invalid_request" and [e["field"] for e in body["errors"]] == [field]


def test_a_bad_user_id_is_a_400_an_unknown_user_a_404_and_no_identity_a_401(client: FlaskClient) -> None:
    bad = client.get("/users/nope/messages", headers=as_(OPERATOR))
    assert bad.status_code == 400 and [e["field"] for e in bad.get_json()["errors"]] == ["userId"]
    unknown = client.get(f"/users/{uuid.uuid4()}/messages", headers=as_(OPERATOR))
    assert unknown.status_code == 404 and unknown.get_json()["field"] == "userId"
    anonymous = client.get(f"/users/{uuid.uuid4()}/messages")
    assert anonymous.status_code == 401
