"""Twilio's inbound and status webhooks through functions-framework's app, signed with Twilio's
real RequestValidator algorithm, on real Postgres; events for agents on Google's Pub/Sub emulator."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app
from twilio.request_validator import RequestValidator

from shared import bootstrap, service
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.events import PubSubPublisher
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.factories import make_user, row, sql, table_counts
from tests.support.fakes import RecordingPublisher, RecordingTaskQueue, VirtualClock

TOKEN = "twilio-test-auth-token"
URL = "http://localhost/"  # what the test client's requests look like from inside the function


@pytest.fixture
def container_settings() -> Settings:
    return Settings(twilio_auth_token=TOKEN)


def client(target: str) -> FlaskClient:
    return create_app(target, MAIN).test_client()


def signed_post(target: str, form: dict[str, str], *, url: str = URL, token: str = TOKEN) -> Any:
    signature = RequestValidator(token).compute_signature(url, form)
    return client(target).post("/", data=form, headers={"X-Twilio-Signature": signature})


def inbound_form(sender: str, body: str, sid: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "From": sender,
        "To": "+15005550006",
        "Body": body,
        "MessageSid": sid or "SM" + uuid.uuid4().hex,
        "AccountSid": "AC" + "0" * 32,
        "NumMedia": "0",
        **extra,
    }


def test_a_signed_inbound_message_is_recorded_once_and_answered_with_empty_twiml(
    container: bootstrap.Container, database_url: str
) -> None:
    form = inbound_form("+15553330001", "yes please, book it")
    resp = signed_post("twilio_inbound", form)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/xml")
    assert resp.get_data(as_text=True).endswith("<Response></Response>")
    users = sql(database_url, "select id, phone_number, opted_out_at from users")
    assert [(u[1], u[2]) for u in users] == [("+15553330001", None)]
    rows = sql(database_url, "select direction, content, twilio_message_sid, conversation_id from messages")
    assert [(r[0], r[1], r[2]) for r in rows] == [("inbound", "yes please, book it", form["MessageSid"])]
    assert rows[0][3] is not None
    # Twilio retries webhooks: the same MessageSid again changes nothing.
    assert signed_post("twilio_inbound", form).status_code == 200
    assert sql(database_url, "select count(*) from messages") == [(1,)]
    events = sql(database_url, "select event_type, attributes from events_outbox")
    assert events == [
        ("inbound_message", {"eventType": "inbound_message", "userId": str(users[0][0]), "agentType": ""})
    ]


def test_an_mms_with_an_empty_body_is_accepted(container: bootstrap.Container, database_url: str) -> None:
    form = inbound_form("+15553330002", "", NumMedia="1", MediaUrl0="https://example.test/cat.jpg")
    assert signed_post("twilio_inbound", form).status_code == 200
    assert sql(database_url, "select content from messages") == [("",)]


@pytest.mark.parametrize("case", ["tampered body", "wrong url", "missing header", "wrong token"])
def test_a_bad_signature_answers_403_and_records_nothing(
    container: bootstrap.Container, database_url: str, case: str
) -> None:
    form = inbound_form("+15553330003", "hello")
    before = table_counts(database_url)
    if case == "tampered body":
        signature = RequestValidator(TOKEN).compute_signature(URL, form)
        resp = client("twilio_inbound").post(
            "/", data=form | {"Body": "STOP"}, headers={"X-Twilio-Signature": signature}
        )
    elif case == "wrong url":
        resp = signed_post("twilio_inbound", form, url="https://attacker.example/twilio_inbound")
    elif case == "missing header":
        resp = client("twilio_inbound").post("/", data=form)
    else:
        resp = signed_post("twilio_inbound", form, token="not-the-token")
    assert resp.status_code == 403 and resp.get_json()["error"] == "forbidden"
    assert table_counts(database_url) == before
    assert sql(database_url, "select count(*) from events_outbox") == [(0,)]


def test_the_public_url_is_rebuilt_behind_googles_front_end(container: bootstrap.Container) -> None:
    form = inbound_form("+15553330004", "hi")
    public = "https://us-central1-proj.cloudfunctions.net/twilio_inbound"
    signature = RequestValidator(TOKEN).compute_signature(public, form)
    headers = {
        "X-Twilio-Signature": signature,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "us-central1-proj.cloudfunctions.net",
    }
    import os

    os.environ["K_SERVICE"] = "twilio_inbound"
    try:
        resp = client("twilio_inbound").post("/", data=form, headers=headers)
    finally:
        del os.environ["K_SERVICE"]
    assert resp.status_code == 200


def test_opt_out_end_to_end(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15553330005")
    schedule = client("schedule_message")
    body = {"userId": str(user), "agentId": "concierge", "messageData": {"content": "news!"}}
    queued = [schedule.post("/", json=body).get_json()["messageId"] for _ in range(3)]
    assert signed_post("twilio_inbound", inbound_form("+15553330005", "  stop ")).status_code == 200
    assert {r[0] for r in sql(database_url, "select status from message_queue")} == {"cancelled"}
    assert {row(database_url, uuid.UUID(m))["reason"] for m in queued} == {"opted_out"}
    refused = schedule.post("/", json=body)
    assert refused.status_code == 409 and refused.get_json()["error"] == "opted_out"
    # A task already in flight for a cancelled message sends nothing.
    outcome = service.deliver(
        {"messageId": queued[0], "generation": 0},
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=container.policy,
        clock=VirtualClock(T0),
    )
    assert outcome.reason == "already_cancelled" and sms_sink.messages() == []
    cancelled_events = sql(
        database_url, "select count(*) from events_outbox where event_type = 'message.cancelled'"
    )
    assert cancelled_events == [(3,)]
    # HELP changes nothing; START opts back in.
    assert signed_post("twilio_inbound", inbound_form("+15553330005", "help")).status_code == 200
    assert sql(database_url, "select opted_out_at is not null from users") == [(True,)]
    assert signed_post("twilio_inbound", inbound_form("+15553330005", "Start")).status_code == 200
    assert schedule.post("/", json=body).status_code == 201


def test_a_claimed_message_is_not_sent_after_stop(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
) -> None:
    user = make_user(store, phone="+15553330006")
    mid = (
        client("schedule_message")
        .post("/", json={"userId": str(user), "agentId": "a", "messageData": {"content": "x"}})
        .get_json()["messageId"]
    )
    signed_post("twilio_inbound", inbound_form("+15553330006", "UNSUBSCRIBE"))
    outcome = service.deliver(
        {"messageId": mid},
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=container.policy,
        clock=VirtualClock(T0),
    )
    assert outcome.action == "skipped" and sms_sink.messages() == []


def _sent_message(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    sender: TwilioSender,
    phone: str,
) -> tuple[uuid.UUID, str]:
    user = make_user(store, phone=phone)
    mid = (
        client("schedule_message")
        .post("/", json={"userId": str(user), "agentId": "a", "messageData": {"content": "hi"}})
        .get_json()["messageId"]
    )
    outcome = service.deliver(
        {"messageId": mid},
        store=store,
        tasks=tasks,
        sms=sender,
        config=container.policy,
        clock=VirtualClock(T0),
    )
    assert outcome.sid
    return user, outcome.sid


@pytest.mark.parametrize(
    ("sequence", "final"),
    [
        (["sent", "delivered"], "delivered"),
        (["delivered", "sent"], "delivered"),  # a late 'sent' never moves it back
        (["sent", "sent", "delivered", "delivered"], "delivered"),  # repeats are harmless
        (["queued", "sending", "sent", "undelivered"], "undelivered"),
        (["failed", "delivered"], "failed"),
    ],
)
def test_status_callbacks_in_any_order_leave_the_right_final_state(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
    sequence: list[str],
    final: str,
) -> None:
    _, sid = _sent_message(container, store, tasks, twilio_sender, "+15553330010")
    for status in sequence:
        resp = signed_post("twilio_status", {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC1"})
        assert resp.status_code == 200
    [(status, delivered_at)] = sql(
        database_url, "select status, delivered_at from messages where twilio_message_sid = %s", sid
    )
    assert status == final
    assert (delivered_at is not None) == (final == "delivered")


def test_an_undeliverable_number_stops_further_sends(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
) -> None:
    user, sid = _sent_message(container, store, tasks, twilio_sender, "+15553330011")
    later = client("schedule_message").post(
        "/", json={"userId": str(user), "agentId": "a", "messageData": {"content": "again"}}
    )
    assert later.status_code == 201
    form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30006"}
    assert signed_post("twilio_status", form).status_code == 200
    assert row(database_url, uuid.UUID(later.get_json()["messageId"]))["status"] == "cancelled"
    refused = client("schedule_message").post(
        "/", json={"userId": str(user), "agentId": "a", "messageData": {"content": "once more"}}
    )
    assert refused.status_code == 409 and refused.get_json()["error"] == "undeliverable"
    failed = sql(
        database_url, "select payload->>'errorCode' from events_outbox where event_type = 'message.failed'"
    )
    assert failed == [("30006",)]


def test_an_unknown_sid_is_acknowledged(container: bootstrap.Container, database_url: str) -> None:
    resp = signed_post("twilio_status", {"MessageSid": "SMunknown", "MessageStatus": "delivered"})
    assert resp.status_code == 200
    assert sql(database_url, "select count(*) from messages") == [(0,)]


def test_events_reach_pubsub_and_survive_an_outage(
    container: bootstrap.Container,
    store: PostgresStore,
    database_url: str,
    pubsub_emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from google.cloud import pubsub_v1

    from shared.dev.pubsub_emulator import ensure_topic, subscriber_client, subscription_path

    project = pubsub_emulator.project
    suffix = uuid.uuid4().hex[:8]
    topics = {"events": f"events-{suffix}", "inbound": f"inbound-{suffix}"}
    for name in topics.values():
        ensure_topic(pubsub_emulator.host, project, name)
    sub = subscription_path(project, f"agents-{suffix}")
    with subscriber_client(pubsub_emulator.host) as subscriber:
        subscriber.create_subscription(name=sub, topic=f"projects/{project}/topics/{topics['inbound']}")

    user = make_user(store, phone="+15553330012", poc_agent_type="concierge")
    # Pub/Sub down: the webhook still answers, the message is recorded, the event waits.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    down = PubSubPublisher(pubsub_v1.PublisherClient(), project=project, topics=topics, timeout_seconds=1)
    container._ports["events"] = down
    assert signed_post("twilio_inbound", inbound_form("+15553330012", "is it booked?")).status_code == 200
    assert sql(database_url, "select count(*) from messages where direction = 'inbound'") == [(1,)]
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(1,)]

    # Back up: the next drain (the sweep's) publishes it, with the documented attributes.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    up = PubSubPublisher(pubsub_v1.PublisherClient(), project=project, topics=topics)
    later = VirtualClock(T0 + timedelta(minutes=1))
    assert service.drain_events(store=store, publisher=up, clock=later) == (1, 0, 0, False)
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(0,)]
    with subscriber_client(pubsub_emulator.host) as subscriber:
        received = subscriber.pull(subscription=sub, max_messages=10, timeout=10)
    [msg] = received.received_messages
    attributes = dict(msg.message.attributes)
    assert attributes == {"eventType": "inbound_message", "userId": str(user), "agentType": "concierge"}
    data = json.loads(msg.message.data)
    assert data["body"] == "is it booked?" and data["from"] == "+15553330012"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connections to it are refused, as in a Pub/Sub outage


def _waiting_events(store: PostgresStore, n: int) -> None:
    """`n` inbound_message events in the outbox, as if earlier drains had all failed."""
    for i in range(n):
        sid = "SM" + uuid.uuid4().hex
        store.inbound(f"+1555334{i:04d}", f"earlier {i}", sid, keyword=None, num_media=0, now=T0)


class CountingPublisher:
    """The real publisher, counting its publish calls and the timeouts it was given."""

    def __init__(self, inner: PubSubPublisher) -> None:
        self.inner = inner
        self.timeouts: list[float | None] = []

    def publish(
        self, topic: str, data: bytes, attributes: dict[str, str], *, timeout: float | None = None
    ) -> str:
        self.timeouts.append(timeout)
        if timeout is None:
            return self.inner.publish(topic, data, attributes)
        return self.inner.publish(topic, data, attributes, timeout=timeout)


def test_a_pubsub_outage_does_not_hold_the_inbound_webhook(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from google.cloud import pubsub_v1

    _waiting_events(store, 5)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{_closed_port()}")
    # The deployed publisher, with its own 10 s bound per publish.
    down = PubSubPublisher(pubsub_v1.PublisherClient(), project="outage", topics={"inbound": "inbound"})
    counting = CountingPublisher(down)
    container._ports["events"] = counting
    started = time.monotonic()
    resp = signed_post("twilio_inbound", inbound_form("+15553330020", "still on for tonight?"))
    elapsed = time.monotonic() - started
    # Twilio gives a webhook 15 s and never retries it: the answer comes within the drain's budget
    # (1 s) and the request's own work, generously bounded here (behaviour, not a benchmark).
    assert resp.status_code == 200 and elapsed < 3, elapsed
    assert len(counting.timeouts) == 1 and 0 < (counting.timeouts[0] or 0) <= 1.0
    assert sql(database_url, "select count(*) from messages where content = 'still on for tonight?'") == [
        (1,)
    ]
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(6,)]
    # The sweep drains the rest once Pub/Sub answers.
    up = RecordingPublisher()
    report = service.sweep(
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=container.policy,
        clock=VirtualClock(T0 + timedelta(minutes=1)),
        trigger="test",
        events=up,
    )
    assert report.events_published == 6 and len(up.published) == 6
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(0,)]


def test_a_drain_in_an_outage_makes_one_publish_attempt_not_one_per_event(
    store: PostgresStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.cloud import pubsub_v1

    _waiting_events(store, 4)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{_closed_port()}")
    down = PubSubPublisher(
        pubsub_v1.PublisherClient(), project="outage", topics={"inbound": "inbound"}, timeout_seconds=1
    )
    counting = CountingPublisher(down)
    drained = service.drain_events(store=store, publisher=counting, clock=VirtualClock(T0))
    assert drained == (0, 1, 0, True) and counting.timeouts == [None]
    rows = sql(database_url, "select published_at, last_error from events_outbox order by id")
    assert [p for p, _ in rows] == [None] * 4
    assert rows[0][1] and "failed" in rows[0][1] and [e for _, e in rows[1:]] == [None] * 3


def test_the_drain_stops_when_its_time_budget_is_spent(store: PostgresStore, database_url: str) -> None:
    _waiting_events(store, 5)
    elapsed = [0.0]

    class SlowPublisher(RecordingPublisher):
        """Pub/Sub answering, slowly: each publish takes 0.4 s of the (injected) monotonic clock."""

        def publish(
            self, topic: str, data: bytes, attributes: dict[str, str], *, timeout: float | None = None
        ) -> str:
            assert timeout is not None and timeout <= 1.0 - elapsed[0] + 1e-9
            elapsed[0] += 0.4
            return super().publish(topic, data, attributes, timeout=timeout)

    slow = SlowPublisher()
    drained = service.drain_events(
        store=store,
        publisher=slow,
        clock=VirtualClock(T0),
        budget_seconds=1.0,
        monotonic=lambda: elapsed[0],
    )
    # Publishes start at 0, 0.4 and 0.8 s; at 1.2 s the budget is spent and the rest waits.
    assert drained == (3, 0, 0, True) and len(slow.published) == 3
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(2,)]


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ({"MessageStatus": "delivered"}, ("delivered", "2025-06-02T15:00:00.000Z", None)),
        ({"MessageStatus": "undelivered", "ErrorCode": "30006"}, ("undelivered", None, "30006")),
    ],
)
def test_get_shows_what_twilio_said_of_the_delivery(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
    form: dict[str, str],
    expected: tuple[str | None, ...],
) -> None:
    _, sid = _sent_message(container, store, tasks, twilio_sender, "+15553330044")
    [(message_id,)] = sql(database_url, "select id from message_queue where twilio_message_sid = %s", sid)
    before = client("schedule_message").get(f"/messages/{message_id}").get_json()
    assert (before["status"], before["deliveryStatus"], before["deliveredAt"]) == ("sent", "sent", None)
    assert signed_post("twilio_status", {"MessageSid": sid, **form}).status_code == 200
    after = client("schedule_message").get(f"/messages/{message_id}").get_json()
    assert (after["deliveryStatus"], after["deliveredAt"], after["deliveryErrorCode"]) == expected


def test_get_tells_the_whole_story_of_a_message(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
) -> None:
    """Why, not only when: the timeline of decisions with their reasons, and the explanation."""
    _, sid = _sent_message(container, store, tasks, twilio_sender, "+15553330055")
    [(message_id,)] = sql(database_url, "select id from message_queue where twilio_message_sid = %s", sid)
    assert signed_post("twilio_status", {"MessageSid": sid, "MessageStatus": "delivered"}).status_code == 200
    got = client("schedule_message").get(f"/messages/{message_id}").get_json()
    assert got["reason"] == "sent" and "explanation" in got
    actions = [e["action"] for e in got["timeline"]]
    # (here everything happened at the virtual T0: entries of one instant come in no set order)
    assert sorted(actions) == ["scheduled", "sent", "status_delivered"], actions
    scheduled = next(e for e in got["timeline"] if e["action"] == "scheduled")
    assert scheduled["reason"] == "ok" and scheduled["explanation"] == "allowed now"
    assert scheduled["scheduledFor"] is not None
    sent = next(e for e in got["timeline"] if e["action"] == "sent")
    assert sent["twilioMessageSid"] == sid
    at = [e["at"] for e in got["timeline"]]
    assert at == sorted(at)
