"""Cloud Scheduler → Pub/Sub → sweep_queue, end to end: a message published to the sweep topic on
Google's Pub/Sub emulator reaches the sweep_queue function through a push subscription, in the
CloudEvent form Cloud Functions uses, and the sweep runs against the real database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.dev.stack import LocalStack, Ports
from shared.store.postgres import PostgresStore
from tests.support.factories import make_user, sql

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


@pytest.fixture
def stack(tmp_path: Path, database_url: str, pubsub_emulator: object) -> Iterator[LocalStack]:
    # pubsub_emulator: only for its loud failure in CI (or skip locally) when gcloud is missing.
    s = LocalStack(
        tmp_path / "stack",
        ports=Ports.free(),
        database_url=database_url,
        quiet=True,
        use_pubsub=True,
        sweep_interval=0,
    )
    with s:
        yield s


def test_a_sweep_topic_message_runs_the_sweep_function(stack: LocalStack, database_url: str) -> None:
    store = PostgresStore(database_url)
    try:
        user = make_user(store)
    finally:
        store.close()
    sql(
        database_url,
        "insert into message_queue (user_id, agent_id, message_data, scheduled_for, expires_at) values"
        " (%s, 'e2e', '{\"content\": \"late\"}', now() - interval '1 hour', now() - interval '1 minute')",
        user,
    )
    code, body = stack.get_json(stack.url_of("health"))
    assert (code, body["reason"]) == (503, "no_sweep_yet")

    message_id = stack.publish_sweep()

    deadline = time.monotonic() + 15
    runs: list[tuple[object, ...]] = []
    while time.monotonic() < deadline and not runs:
        runs = sql(database_url, "select trigger, counts from sweep_runs")
        time.sleep(0.1)
    assert runs, "the sweep never ran"
    [(trigger, counts)] = runs
    assert trigger == f"pubsub:{message_id}"  # the CloudEvent's id is the Pub/Sub message id
    assert isinstance(counts, dict) and counts["expired"] == 1
    assert sql(database_url, "select status from message_queue") == [("expired",)]
    code, body = stack.get_json(stack.url_of("health"))
    assert code == 200 and body["stats"]["processorRunning"] is True


def test_an_inbound_reply_reaches_agents_on_the_inbound_topic(stack: LocalStack, database_url: str) -> None:
    import json
    import urllib.parse
    import urllib.request

    from shared.dev.pubsub_emulator import subscriber_client, subscription_path
    from shared.dev.stack import INBOUND_TOPIC, PROJECT

    host = stack.pubsub_host
    assert host is not None
    sub = subscription_path(PROJECT, "agents-e2e")
    with subscriber_client(host) as subscriber:
        subscriber.create_subscription(name=sub, topic=f"projects/{PROJECT}/topics/{INBOUND_TOPIC}")
    form = urllib.parse.urlencode(
        {
            "From": "+15558880001",
            "To": "+15005550006",
            "Body": "sounds good",
            "MessageSid": "SMe2e1",
            "NumMedia": "0",
        }
    ).encode()
    # Unsigned: the dev stack's webhooks accept loopback requests (TWILIO_SIGNATURE_BYPASS=local-only).
    with urllib.request.urlopen(
        urllib.request.Request(stack.url_of("twilio_inbound"), data=form), timeout=10
    ) as r:
        assert r.status == 200 and b"<Response></Response>" in r.read()
    with subscriber_client(host) as subscriber:
        received = subscriber.pull(subscription=sub, max_messages=5, timeout=10)
    [msg] = received.received_messages
    assert dict(msg.message.attributes)["eventType"] == "inbound_message"
    assert json.loads(msg.message.data)["body"] == "sounds good"
    assert sql(database_url, "select direction, content from messages") == [("inbound", "sounds good")]
