"""The HTTP functions through functions-framework's own app (create_app(...).test_client()), on real
Postgres, with recorded request bodies from tests/data."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.constants import SCHEDULE_DATA as DATA
from tests.support.factories import make_user, row, sql, table_counts
from tests.support.fakes import RecordingTaskQueue, VirtualClock


@pytest.fixture
def schedule_client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


@pytest.fixture
def deliver_client(container: bootstrap.Container) -> FlaskClient:
    return create_app("deliver_message", MAIN).test_client()


def load(name: str, **subst: str) -> Any:
    text = (DATA / name).read_text()
    for key, value in subst.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text)


def test_schedule_answers_201_with_the_plan_and_status_is_readable(
    schedule_client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store, "America/Chicago")
    resp = schedule_client.post("/", json=load("valid.json", userId=str(user)))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is True and body["status"] == "queued"
    assert body["scheduledFor"] == "2025-06-02T15:00:00.000Z" and body["reason"] == "ok"
    message_id = uuid.UUID(body["messageId"])
    assert row(database_url, message_id)["priority"] == "high"
    assert [t.message_id for t in tasks.tasks] == [message_id]

    got = schedule_client.get(f"/messages/{message_id}")
    assert got.status_code == 200
    status = got.get_json()
    assert status["status"] == "queued" and status["scheduledFor"] == body["scheduledFor"]
    assert status["sentAt"] is None and status["reason"] == "ok"


def test_a_second_message_is_planned_after_the_cooldown_with_its_reason(
    schedule_client: FlaskClient, store: PostgresStore
) -> None:
    user = make_user(store, "America/Chicago")
    payload = load("valid.json", userId=str(user))
    schedule_client.post("/", json=payload)
    second = schedule_client.post("/", json=payload).get_json()
    assert second["scheduledFor"] == "2025-06-02T15:00:30.000Z"
    assert second["reason"] == "cooldown" and "cooldown" in second["explanation"]
    assert second["blockedBy"] == ["cooldown"]


BAD = load("bad_inputs.json")


@pytest.mark.parametrize("case", BAD, ids=[c["case"] for c in BAD])
def test_bad_input_answers_400_naming_each_field_and_writes_nothing(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str, case: dict[str, Any]
) -> None:
    user = make_user(store)
    body = json.loads(json.dumps(case["body"]).replace("{userId}", str(user)).replace("{long}", "x" * 1601))
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=body)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    answer = resp.get_json()
    assert answer["success"] is False and answer["error"] == "invalid_request"
    assert sorted(e["field"] for e in answer["errors"]) == sorted(case["fields"])
    assert all(e["reason"] for e in answer["errors"])
    assert table_counts(database_url) == before


@pytest.mark.parametrize(
    ("data", "content_type", "field"),
    [
        (b'{"userId": ', "application/json", "body"),
        (b"\xff\xfe", "application/json", "body"),
        (b"userId=1", "application/x-www-form-urlencoded", "Content-Type"),
        (b'{"userId": "x"}', "text/plain", "Content-Type"),
        (b"", "", "Content-Type"),
    ],
)
def test_unparseable_requests_answer_400(
    schedule_client: FlaskClient, database_url: str, data: bytes, content_type: str, field: str
) -> None:
    before = table_counts(database_url)
    resp = schedule_client.post("/", data=data, content_type=content_type)
    assert resp.status_code == 400
    assert [e["field"] for e in resp.get_json()["errors"]] == [field]
    assert table_counts(database_url) == before


def test_unknown_user_answers_404(schedule_client: FlaskClient, database_url: str) -> None:
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=load("valid.json", userId=str(uuid.uuid4())))
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "not_found" and resp.get_json()["field"] == "userId"
    assert table_counts(database_url) == before


def test_a_user_with_an_unknown_timezone_answers_400(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, "Mars/Olympus_Mons")
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=load("valid.json", userId=str(user)))
    assert resp.status_code == 400
    [error] = resp.get_json()["errors"]
    assert error["field"] == "userId" and "Mars/Olympus_Mons" in error["reason"]
    assert table_counts(database_url) == before


def test_an_opted_out_user_answers_409(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    sql(database_url, "update users set opted_out_at = %s where id = %s", T0, user)
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=load("valid.json", userId=str(user)))
    assert resp.status_code == 409 and resp.get_json()["error"] == "opted_out"
    assert table_counts(database_url) == before


def test_a_message_that_cannot_go_out_before_it_expires_is_refused(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, "America/New_York")
    # 23:00 in New York: quiet hours until 08:00, but the message expires at midnight.
    body = load("valid.json", userId=str(user)) | {"priority": "medium", "expiresAt": "2025-06-03T04:00:00Z"}
    container = bootstrap.container()
    container.clock = VirtualClock(datetime(2025, 6, 3, 3, 0, tzinfo=UTC))  # type: ignore[assignment]
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=body)
    assert resp.status_code == 422
    answer = resp.get_json()
    assert answer["error"] == "not_deliverable" and answer["reason"] == "quiet_hours"
    assert answer["earliestAllowed"] == "2025-06-03T12:00:00.000Z"
    assert table_counts(database_url) == before


def test_idempotency_key_replays_and_conflicts(
    schedule_client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store)
    body = load("valid.json", userId=str(user))
    first = schedule_client.post("/", json=body, headers={"Idempotency-Key": "turn-42"})
    assert first.status_code == 201
    replay = schedule_client.post("/", json=body | {"idempotencyKey": "turn-42"})
    assert replay.status_code == 200
    assert replay.get_json()["messageId"] == first.get_json()["messageId"]
    assert replay.get_json()["idempotentReplay"] is True
    other = body | {"messageData": {"content": "something else"}}
    conflict = schedule_client.post("/", json=other, headers={"Idempotency-Key": "turn-42"})
    assert conflict.status_code == 409 and conflict.get_json()["error"] == "idempotency_key_reused"
    assert sql(database_url, "select count(*) from message_queue") == [(1,)]
    assert len(tasks.tasks) == 1


def test_a_replay_answers_the_original_body_but_idempotent_replay(
    schedule_client: FlaskClient, store: PostgresStore
) -> None:
    """README promises the same body: the plan's blockedBy and the ids it superseded are the
    stored message's, not an empty list. Only idempotentReplay differs (it says which answer this
    is); status, scheduledFor and reason are the message's current state, the same here since
    nothing happened to it in between."""
    user = make_user(store, "America/Chicago")
    body = load("valid.json", userId=str(user))
    assert schedule_client.post("/", json=body).status_code == 201  # the cooldown's reason
    older = schedule_client.post("/", json=body | {"topicKey": "weather"}).get_json()
    keyed = body | {"topicKey": "weather", "idempotencyKey": "turn-9"}
    first = schedule_client.post("/", json=keyed)
    assert first.status_code == 201, first.get_data(as_text=True)
    original = first.get_json()
    assert "cooldown" in original["blockedBy"] and original["superseded"] == [older["messageId"]]
    replay = schedule_client.post("/", json=keyed)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    assert replay.get_json() == original | {"idempotentReplay": True}


def test_a_task_creation_failure_still_answers_201_and_keeps_the_row(
    schedule_client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store)
    tasks.fail_next = 1
    resp = schedule_client.post("/", json=load("valid.json", userId=str(user)))
    assert resp.status_code == 201
    assert row(database_url, uuid.UUID(resp.get_json()["messageId"]))["status"] == "queued"
    assert tasks.tasks == []


def test_get_of_an_unknown_or_malformed_message_id(schedule_client: FlaskClient) -> None:
    assert schedule_client.get(f"/messages/{uuid.uuid4()}").status_code == 404
    bad = schedule_client.get("/messages/not-a-uuid")
    assert bad.status_code == 400 and bad.get_json()["errors"][0]["field"] == "messageId"
    assert schedule_client.put("/").status_code == 405


def test_database_outage_answers_503_without_a_stack_trace(tasks: RecordingTaskQueue) -> None:
    dead = PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=1.0)
    c = bootstrap.Container(Settings(), store=dead, tasks=tasks, clock=VirtualClock(T0))
    previous = bootstrap.install(c)
    try:
        client = create_app("schedule_message", MAIN).test_client()
        resp = client.post("/", json=load("valid.json", userId=str(uuid.uuid4())))
        assert resp.status_code == 503
        assert resp.get_json()["error"] == "database_unavailable"
        assert "Traceback" not in resp.get_data(as_text=True) and resp.headers["Retry-After"]
        assert tasks.tasks == []
    finally:
        bootstrap.install(previous)
        dead.close()


def test_deliver_over_http(
    schedule_client: FlaskClient,
    deliver_client: FlaskClient,
    store: PostgresStore,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15551119999")
    message_id = schedule_client.post("/", json=load("valid.json", userId=str(user))).get_json()["messageId"]
    resp = deliver_client.post(
        "/", json={"messageId": message_id, "generation": 0}, headers={"X-CloudTasks-TaskRetryCount": "0"}
    )
    assert resp.status_code == 200
    assert resp.get_json()["action"] == "sent" and resp.get_json()["twilioMessageSid"].startswith("SM")
    assert [m["to"] for m in sms_sink.messages()] == ["+15551119999"]
    # Transient provider trouble: 503 so Cloud Tasks retries with backoff.
    second = schedule_client.post("/", json=load("valid.json", userId=str(user))).get_json()["messageId"]
    bootstrap.container().clock = VirtualClock(T0 + timedelta(seconds=30))  # type: ignore[assignment]
    sms_sink.add_fault(status=500)
    retry = deliver_client.post("/", json={"messageId": second, "generation": 0})
    assert retry.status_code == 503 and retry.get_json()["action"] == "retry"
    bad = deliver_client.post("/", json={"messageId": "nope"})
    assert bad.status_code == 400 and bad.get_json()["errors"][0]["field"] == "messageId"


def test_logs_carry_the_request_trace_and_the_message_fields(
    schedule_client: FlaskClient, store: PostgresStore
) -> None:
    import io
    import logging

    from shared.log import TRACE_KEY, JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("orchestrator")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        user = make_user(store)
        resp = schedule_client.post(
            "/",
            json=load("valid.json", userId=str(user)),
            headers={"X-Cloud-Trace-Context": "4bf92f3577b34da6a3ce929d0e0e4736/1;o=1"},
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    [scheduled] = [e for e in entries if e["message"] == "message scheduled"]
    assert scheduled["severity"] == "INFO"
    assert scheduled["messageId"] == resp.get_json()["messageId"] and scheduled["userId"] == str(user)
    assert scheduled["reason"] == "ok"
    assert scheduled[TRACE_KEY] == "projects/local-project/traces/4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_replay_answers_the_first_message_whatever_the_policy_says_now(
    schedule_client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    """An agent retrying after a timeout gets its stored message back, not a refusal the policy
    would give a new message now (here: the user opted out in between)."""
    user = make_user(store)
    body = load("valid.json", userId=str(user)) | {"idempotencyKey": "turn-7"}
    first = schedule_client.post("/", json=body)
    assert first.status_code == 201, first.get_data(as_text=True)
    sql(database_url, "update users set opted_out_at = %s where id = %s", T0, user)
    fresh = schedule_client.post("/", json=body | {"idempotencyKey": "turn-8"})
    assert fresh.status_code != 201 and fresh.get_json()["error"] == "opted_out", fresh.get_data(as_text=True)
    replay = schedule_client.post("/", json=body)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    assert replay.get_json()["messageId"] == first.get_json()["messageId"]
    assert replay.get_json()["idempotentReplay"] is True
    assert sql(database_url, "select count(*) from message_queue") == [(1,)]
    assert len(tasks.tasks) == 1


def test_concurrent_requests_with_one_idempotency_key_make_one_message(
    store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    import threading

    from shared import service
    from shared.domain import Limits

    user = make_user(store)
    body = load("valid.json", userId=str(user)) | {"idempotencyKey": "turn-race"}
    barrier = threading.Barrier(8)
    results: list[service.ScheduleResult] = []

    def run() -> None:
        barrier.wait(timeout=10)
        results.append(
            service.schedule(body, store=store, tasks=tasks, config=service.Policy(limits=Limits()), now=T0)
        )

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert len({r.message.id for r in results}) == 1
    assert sorted(r.created for r in results) == [False] * 7 + [True]
    assert sql(database_url, "select count(*) from message_queue") == [(1,)]
    assert len(tasks.tasks) == 1


def test_json_nested_too_deeply_is_a_400_not_a_500(schedule_client: FlaskClient, database_url: str) -> None:
    before = table_counts(database_url)
    body = "[" * 20_000 + "]" * 20_000
    resp = schedule_client.post("/", data=body, content_type="application/json")
    assert resp.status_code == 400, resp.get_data(as_text=True)[:200]
    assert resp.get_json()["errors"] == [{"field": "body", "reason": "JSON nested too deeply"}]
    assert table_counts(database_url) == before


def test_an_error_text_is_stored_and_answered_without_the_phone_number(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15550009876")
    message_id = uuid.UUID(
        schedule_client.post("/", json=load("valid.json", userId=str(user))).get_json()["messageId"]
    )
    twilio_text = "HTTP 400: The 'To' number +15550009876 is not a valid phone number (21211)"
    assert store.fail(message_id, error=twilio_text, reason="twilio_rejected", now=T0)
    stored = row(database_url, message_id)["last_error"]
    assert stored == "HTTP 400: The 'To' number [phone] is not a valid phone number (21211)"
    answered = schedule_client.get(f"/messages/{message_id}").get_json()["lastError"]
    assert answered == stored and "9876" not in answered
    logged = sql(
        database_url,
        "select error from agent_actions_log where message_id = %s and error is not null",
        message_id,
    )
    assert all("9876" not in (e or "") for (e,) in logged)


def test_a_body_over_64_kib_answers_413_with_the_limit_and_writes_nothing(
    schedule_client: FlaskClient, deliver_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    body = json.dumps(load("valid.json", userId=str(user)))
    huge = body + " " * (20 * 1024 * 1024)  # 20 MB: valid JSON, only too large
    before = table_counts(database_url)
    for client, path in ((schedule_client, "/"), (schedule_client, f"/messages/{uuid.uuid4()}/cancel")):
        resp = client.post(path, data=huge, content_type="application/json")
        assert resp.status_code == 413, resp.get_data(as_text=True)
        answer = resp.get_json()
        assert answer["error"] == "payload_too_large" and answer["limit"] == 65536
        assert "65536 bytes (64 KiB)" in answer["message"]
    # Any type: the size is refused before the Content-Type is looked at.
    assert schedule_client.post("/", data=huge, content_type="text/plain").status_code == 413
    assert deliver_client.post("/", data=huge, content_type="application/json").status_code == 413
    assert table_counts(database_url) == before
    # The limit itself is accepted.
    exact = body + " " * (65536 - len(body.encode()))
    assert schedule_client.post("/", data=exact, content_type="application/json").status_code == 201


def test_a_cancel_echoes_its_reason_and_stores_it(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    payload = load("valid.json", userId=str(user))
    first = schedule_client.post("/", json=payload).get_json()["messageId"]
    resp = schedule_client.post(f"/messages/{first}/cancel", json={"reason": "the user rebooked by phone"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer = resp.get_json()
    assert answer["status"] == "cancelled" and answer["alreadyCancelled"] is False
    assert answer["cancelReason"] == "the user rebooked by phone"
    assert row(database_url, uuid.UUID(first))["last_error"] == "the user rebooked by phone"
    [entry] = [
        e
        for e in schedule_client.get(f"/messages/{first}").get_json()["timeline"]
        if e["action"] == "cancelled"
    ]
    assert entry["reason"] == "the user rebooked by phone"
    # Cancelled again with another reason: the first one stays, and is what the answer says.
    again = schedule_client.post(f"/messages/{first}/cancel", json={"reason": "second thoughts"}).get_json()
    assert again["alreadyCancelled"] is True and again["cancelReason"] == "the user rebooked by phone"
    # No body, no reason.
    second = schedule_client.post("/", json=payload).get_json()["messageId"]
    plain = schedule_client.post(f"/messages/{second}/cancel").get_json()
    assert plain["status"] == "cancelled" and plain["cancelReason"] is None


def test_a_post_to_a_read_only_path_is_refused_and_schedules_nothing(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    """A valid schedule body sent to a user's listing, consent or a message's own path (a client
    that built its URL wrong) used to be scheduled as if posted to the root."""
    user = make_user(store)
    body = json.dumps(load("valid.json", userId=str(user)))
    before = table_counts(database_url)
    for path in (f"/users/{user}/messages", f"/users/{user}/consent", f"/messages/{uuid.uuid4()}"):
        resp = schedule_client.post(path, data=body, content_type="application/json")
        assert resp.status_code == 405, (path, resp.get_data(as_text=True))
        assert resp.headers["Allow"] == "GET" and resp.get_json()["error"] == "method_not_allowed"
    resp = schedule_client.post("/no/such/route", data=body, content_type="application/json")
    assert resp.status_code == 404 and resp.get_json()["error"] == "not_found"
    assert table_counts(database_url) == before
    assert schedule_client.post("/", data=body, content_type="application/json").status_code == 201
