"""Agents are who their token says: through functions-framework's app on real Postgres, a caller
may schedule, read and cancel only as the agent ids AGENT_IDENTITIES gives its identity; "*" (an
operator) may do all. CALLER_IDENTITY=header stands in for the verified ID token here, as locally;
the id_token mode reads the same identity from the bearer token's claims."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.config import Settings
from shared.identity import IDENTITY_HEADER, parse_identities
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN
from tests.support.constants import SCHEDULE_DATA as DATA
from tests.support.factories import make_user, row, table_counts
from tests.support.fakes import RecordingTaskQueue

CONCIERGE = "concierge@agents.iam.gserviceaccount.com"
COACH = "coach@agents.iam.gserviceaccount.com"
OPERATOR = "ops@example.com"
IDENTITIES = json.dumps(
    {CONCIERGE: ["concierge_agent", "concierge_reminders"], COACH: ["coach_agent"], OPERATOR: ["*"]}
)


@pytest.fixture
def container_settings() -> Settings:
    return Settings.from_env({"CALLER_IDENTITY": "header", "AGENT_IDENTITIES": IDENTITIES})


@pytest.fixture
def client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


def as_(who: str) -> dict[str, str]:
    return {IDENTITY_HEADER: who}


def payload(user: uuid.UUID, agent: str = "concierge_agent", **extra: Any) -> dict[str, Any]:
    body = json.loads((DATA / "valid.json").read_text().replace("{userId}", str(user)))
    return body | {"agentId": agent} | extra


def scheduled(client: FlaskClient, user: uuid.UUID, who: str = CONCIERGE, **extra: Any) -> str:
    resp = client.post("/", json=payload(user, **extra), headers=as_(who))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json()["messageId"])


def test_an_agent_schedules_as_each_of_its_agent_ids(client: FlaskClient, store: PostgresStore) -> None:
    user = make_user(store)
    scheduled(client, user, agent="concierge_agent")
    scheduled(client, user, agent="concierge_reminders")


def test_an_agent_id_the_caller_may_not_use_is_403_and_stores_nothing(
    client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store)
    before = table_counts(database_url)
    resp = client.post("/", json=payload(user, agent="concierge_agent"), headers=as_(COACH))
    assert resp.status_code == 403
    body = resp.get_json()
    assert body["error"] == "forbidden_agent" and body["agentId"] == "concierge_agent"
    assert COACH in body["message"]
    assert table_counts(database_url) == before and tasks.tasks == []


def test_an_identity_that_is_not_mapped_may_act_as_no_agent(
    client: FlaskClient, store: PostgresStore
) -> None:
    user = make_user(store)
    resp = client.post("/", json=payload(user), headers=as_("stranger@example.com"))
    assert resp.status_code == 403 and resp.get_json()["error"] == "forbidden_agent"


def test_no_identity_is_401(client: FlaskClient, store: PostgresStore) -> None:
    user = make_user(store)
    resp = client.post("/", json=payload(user))
    assert resp.status_code == 401 and resp.get_json()["error"] == "unauthenticated"
    assert client.get(f"/messages/{uuid.uuid4()}").status_code == 401


def test_only_the_owner_or_an_operator_reads_a_message(client: FlaskClient, store: PostgresStore) -> None:
    message_id = scheduled(client, make_user(store))
    mine = client.get(f"/messages/{message_id}", headers=as_(CONCIERGE))
    assert mine.status_code == 200 and mine.get_json()["agentId"] == "concierge_agent"
    theirs = client.get(f"/messages/{message_id}", headers=as_(COACH))
    assert theirs.status_code == 403
    assert theirs.get_json()["error"] == "forbidden_agent" and theirs.get_json()["messageId"] == message_id
    assert "content" not in theirs.get_data(as_text=True)  # nothing of the message leaks
    assert client.get(f"/messages/{message_id}", headers=as_(OPERATOR)).status_code == 200


def test_another_agent_cannot_cancel_a_message(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    message_id = scheduled(client, make_user(store))
    # not its agent / its own agent id, but not the message's (as before identities) / not its agent
    for body, error in ((None, "forbidden_agent"), ({"agentId": "coach_agent"}, "forbidden"),
                        ({"agentId": "concierge_agent"}, "forbidden_agent")):  # fmt: skip
        resp = client.post(f"/messages/{message_id}/cancel", json=body, headers=as_(COACH))
        assert resp.status_code == 403, body
        assert resp.get_json()["error"] == error, body
    assert row(database_url, uuid.UUID(message_id))["status"] == "queued"
    ok = client.post(f"/messages/{message_id}/cancel", headers=as_(CONCIERGE))
    assert ok.status_code == 200 and ok.get_json()["status"] == "cancelled"


def test_an_operator_may_cancel_any_message(client: FlaskClient, store: PostgresStore) -> None:
    message_id = scheduled(client, make_user(store))
    resp = client.post(f"/messages/{message_id}/cancel", headers=as_(OPERATOR))
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"


def test_another_agent_cannot_supersede_by_reusing_the_topic(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    """Supersede acts on the body's agentId and topicKey: a caller that may not use that agentId is
    refused before anything is superseded."""
    user = make_user(store)
    first = scheduled(client, user, topicKey="weather")
    resp = client.post("/", json=payload(user, topicKey="weather"), headers=as_(COACH))
    assert resp.status_code == 403
    assert row(database_url, uuid.UUID(first))["status"] == "queued"
    mine = client.post("/", json=payload(user, topicKey="weather"), headers=as_(CONCIERGE))
    assert mine.status_code == 201 and mine.get_json()["superseded"] == [first]


def _token(claims: dict[str, Any], signed: bool = True) -> str:
    def segment(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    parts = [segment({"alg": "RS256", "typ": "JWT"}), segment(claims)]
    return ".".join(parts + (["c2lnbmF0dXJl"] if signed else []))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "signature-stripped"])
def test_id_token_mode_reads_the_email_claim(
    store: PostgresStore, container: bootstrap.Container, signed: bool
) -> None:
    settings = Settings.from_env({"CALLER_IDENTITY": "id_token", "AGENT_IDENTITIES": IDENTITIES})
    bootstrap.install(bootstrap.Container(settings, store=container.store, tasks=container.tasks))
    client = create_app("schedule_message", MAIN).test_client()
    user = make_user(store)
    token = _token({"email": CONCIERGE.upper(), "email_verified": True, "aud": "x"}, signed=signed)
    ok = client.post("/", json=payload(user), headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 201, ok.get_data(as_text=True)
    coach = _token({"email": COACH, "email_verified": True})
    serverless = {"X-Serverless-Authorization": f"Bearer {coach}", "Authorization": f"Bearer {token}"}
    refused = client.post("/", json=payload(user), headers=serverless)
    assert refused.status_code == 403  # the header Cloud Run verified wins
    for header in ("Bearer", "Bearer not-a-jwt", "Basic abc", f"Bearer {_token({'sub': '1'})}"):
        resp = client.post("/", json=payload(user), headers={"Authorization": header})
        assert resp.status_code == 401, header
        assert resp.get_json()["error"] == "unauthenticated"
    unverified = _token({"email": CONCIERGE, "email_verified": False})
    assert (
        client.post("/", json=payload(user), headers={"Authorization": f"Bearer {unverified}"}).status_code
        == 401
    )
    # a header that only stands in locally is not an identity here
    assert client.post("/", json=payload(user), headers=as_(CONCIERGE)).status_code == 401


def test_without_caller_identity_every_caller_may_act_as_any_agent(
    store: PostgresStore, container: bootstrap.Container
) -> None:
    bootstrap.install(bootstrap.Container(Settings(), store=container.store, tasks=container.tasks))
    client = create_app("schedule_message", MAIN).test_client()
    assert client.post("/", json=payload(make_user(store), agent="anyone")).status_code == 201


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CALLER_IDENTITY": "jwt"}, "CALLER_IDENTITY must be one of"),
        ({"AGENT_IDENTITIES": "[1]"}, "must be a JSON object"),
        ({"AGENT_IDENTITIES": "{"}, "must be a JSON object"),
        ({"AGENT_IDENTITIES": '{"a@b": []}'}, "non-empty list"),
        ({"AGENT_IDENTITIES": '{"a@b": "agent"}'}, "non-empty list"),
    ],
)
def test_bad_identity_settings_are_refused_at_start(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings.from_env(env)


def test_identities_are_matched_whatever_the_case() -> None:
    assert parse_identities('{"Ops@Example.com": ["*"]}') == {"ops@example.com": frozenset({"*"})}
