"""The Pub/Sub adapter (shared.events) with the real google-cloud-pubsub client against an address
where nothing listens: Pub/Sub unreachable, as in an outage."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from google.cloud import pubsub_v1  # type: ignore[attr-defined]

from shared.errors import Unavailable
from shared.events import PubSubPublisher


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connections to it are refused


def test_a_failed_publish_leaves_no_retry_running_behind_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client's default retries a publish for 10 minutes in a background thread, long after the
    # adapter reported the failure and the outbox kept the event for the next drain: a duplicate if
    # it got through late, and one more thread per event for every drain during an outage.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{_closed_port()}")
    publisher = PubSubPublisher(
        pubsub_v1.PublisherClient(), project="outage-test", topics={"events": "events"}, timeout_seconds=1
    )
    before = set(threading.enumerate())
    started = time.monotonic()
    with pytest.raises(Unavailable):
        publisher.publish("events", b"{}", {"eventType": "message.sent"})
    assert time.monotonic() - started < 5
    commits = [t for t in threading.enumerate() if t not in before and "CommitBatch" in t.name]
    for t in commits:
        t.join(timeout=10)
    assert not [t.name for t in commits if t.is_alive()]
