"""End to end: the functions as real functions-framework processes, the Cloud Tasks emulator and the
SMS sink as real processes, on real Postgres. Wall-clock time here, so the cooldown is shortened."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.dev.stack import LocalStack, Ports
from shared.store.postgres import PostgresStore
from tests.support.factories import make_active, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

COOLDOWN = 3


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[LocalStack]:
    s = LocalStack(
        tmp_path / "stack",
        ports=Ports.free(),
        database_url=database_url,
        # The webhooks check X-Twilio-Signature here (no loopback bypass): the sink's receipts must be
        # signed as Twilio signs them to count.
        extra_env={"COOLDOWN_SECONDS": str(COOLDOWN), "LOG_LEVEL": "INFO", "TWILIO_SIGNATURE_BYPASS": ""},
        quiet=True,
    )
    with s:
        yield s


def _at(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_messages_reach_the_sink_through_cloud_tasks_and_keep_the_cooldown(
    stack: LocalStack, database_url: str
) -> None:
    store = PostgresStore(database_url)
    try:
        user = make_user(store, "Pacific/Kiritimati", phone="+15557770001")
        make_active(store, user, datetime.now(UTC))  # active: no quiet hours, whatever the hour
    finally:
        store.close()
    body = {"userId": str(user), "agentId": "e2e", "messageData": {"content": "first"}}

    status, first = stack.post_json(stack.schedule_url, body)
    assert status == 201, first
    accepted = datetime.now(UTC)
    arrived = _wait(stack, 1, timeout=2.0)
    assert arrived[0]["body"] == "first"
    assert (_at(arrived[0]["received_at"]) - accepted).total_seconds() < 2.0

    status, second = stack.post_json(stack.schedule_url, body | {"messageData": {"content": "second"}})
    assert status == 201 and second["reason"] == "cooldown", second
    arrived = _wait(stack, 2, timeout=COOLDOWN + 5)
    gap = (_at(arrived[1]["received_at"]) - _at(arrived[0]["received_at"])).total_seconds()
    assert gap >= COOLDOWN, arrived
    assert [m["body"] for m in arrived] == ["first", "second"]

    code, status_doc = stack.get_json(f"{stack.schedule_url}messages/{first['messageId']}")
    assert code == 200 and status_doc["status"] == "sent" and status_doc["sentAt"]
    assert uuid.UUID(second["messageId"])


def _wait(stack: LocalStack, count: int, timeout: float) -> list[dict[str, object]]:
    import time

    deadline = time.monotonic() + timeout
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        found = [m for m in stack.sink_messages() if m["to"] == "+15557770001"]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"expected {count} message(s) at the sink within {timeout} s, got {found}")


def test_health_is_healthy_right_after_start_not_a_minute_later(stack: LocalStack) -> None:
    """The first sweep runs when the stack starts (as a deployment's Cloud Scheduler would have run
    one in the last minute), so health does not answer 503 for the first minute."""
    import time

    deadline = time.monotonic() + 20
    code, body = stack.get_json(stack.url_of("health"))
    while code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        code, body = stack.get_json(stack.url_of("health"))
    assert code == 200, body
    assert body["stats"]["processorRunning"] is True


def _active_user(database_url: str, phone: str) -> str:
    store = PostgresStore(database_url)
    try:
        user = make_user(store, "Pacific/Kiritimati", phone=phone)
        make_active(store, user, datetime.now(UTC))
    finally:
        store.close()
    return str(user)


def _wait_delivery(
    stack: LocalStack, message_id: str, wanted: str, timeout: float = 15.0
) -> dict[str, object]:
    import time

    deadline = time.monotonic() + timeout
    doc: dict[str, object] = {}
    while time.monotonic() < deadline:
        _, doc = stack.get_json(f"{stack.schedule_url}messages/{message_id}")
        if doc.get("deliveryStatus") == wanted:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"deliveryStatus never became {wanted!r}: {doc}")


def test_the_sinks_signed_receipts_make_a_message_delivered_and_its_events_arrive(
    stack: LocalStack, database_url: str
) -> None:
    user = _active_user(database_url, "+15557770002")
    status, sent = stack.post_json(
        stack.schedule_url, {"userId": user, "agentId": "e2e", "messageData": {"content": "hello"}}
    )
    assert status == 201, sent
    doc = _wait_delivery(stack, sent["messageId"], "delivered")
    assert doc["deliveredAt"] and doc["deliveryErrorCode"] is None, doc
    _, answer = stack.get_json(f"{stack.sink_url}/_sink/callbacks")
    assert [(c["status"], c["answer"]) for c in answer["callbacks"] if c["to"] == "+15557770002"] == [
        ("sent", 200),
        ("delivered", 200),
    ]

    if stack.pubsub_host is None:
        pytest.skip("no Google Cloud CLI: the stack has no Pub/Sub emulator, so no events to read")
    stack.publish_sweep()  # the sweep publishes what the outbox holds, as every minute
    import time

    deadline = time.monotonic() + 20
    kinds: set[object] = set()
    while time.monotonic() < deadline and not {"message.sent", "message.delivered"} <= kinds:
        mine = [e for e in stack.events() if e["attributes"].get("userId") == user]
        kinds = {e["attributes"].get("eventType") for e in mine}
        time.sleep(0.2)
    assert {"message.sent", "message.delivered"} <= kinds, stack.events()


def test_a_number_switched_to_undelivered_shows_undelivered_with_30006(
    stack: LocalStack, database_url: str
) -> None:
    user = _active_user(database_url, "+15557770003")
    code, _ = stack.post_json(
        f"{stack.sink_url}/_sink/outcomes", {"to": "+15557770003", "status": "undelivered"}
    )
    assert code == 201
    status, sent = stack.post_json(
        stack.schedule_url, {"userId": user, "agentId": "e2e", "messageData": {"content": "hello"}}
    )
    assert status == 201, sent
    doc = _wait_delivery(stack, sent["messageId"], "undelivered")
    assert str(doc["deliveryErrorCode"]) == "30006" and doc["deliveredAt"] is None, doc
