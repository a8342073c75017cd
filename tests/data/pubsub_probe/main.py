"""A tiny CloudEvent function for tests/integration/test_pubsub_push.py.

functions-framework runs it as a real process (`--signature-type cloudevent --target on_event`). For
every event it appends one JSON line to the file named by $PUBSUB_PROBE_OUT: the CloudEvent's id,
type, source, subject and time, the base64-decoded `data["message"]["data"]` (as text, and the raw
base64), the message's attributes, the keys of `data` and of `data["message"]`, and the outcome.

A message with the attribute `probe_fail_attempts=N` makes the first N deliveries (per message ID and
source) raise, so functions-framework answers 500 and the push is retried; those are recorded with
outcome "failed".
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import functions_framework
from cloudevents.http.event import CloudEvent

OUT_ENV = "PUBSUB_PROBE_OUT"
FAIL_ATTRIBUTE = "probe_fail_attempts"


def _earlier_attempts(path: str, message_id: object, source: object) -> int:
    try:
        with open(path, encoding="utf-8") as out:
            records = [json.loads(line) for line in out if line.strip()]
    except FileNotFoundError:
        return 0
    return sum(1 for r in records if r["message_id"] == message_id and r["source"] == source)


@functions_framework.cloud_event
def on_event(event: CloudEvent) -> None:
    path = os.environ[OUT_ENV]
    data: Any = event.get_data()
    message: dict[str, Any] = data.get("message", {}) if isinstance(data, dict) else {}
    raw = message.get("data")
    attributes = message.get("attributes")
    fail_attempts = int((attributes or {}).get(FAIL_ATTRIBUTE, 0))
    failing = _earlier_attempts(path, message.get("messageId"), event.get("source")) < fail_attempts
    record = {
        "id": event.get("id"),
        "type": event.get("type"),
        "source": event.get("source"),
        "subject": event.get("subject"),
        "time": event.get("time"),
        "data": base64.b64decode(raw).decode("utf-8", errors="replace") if raw is not None else None,
        "data_b64": raw,
        "attributes": attributes,
        "message_id": message.get("messageId"),
        "publish_time": message.get("publishTime"),
        "data_keys": sorted(data) if isinstance(data, dict) else None,
        "message_keys": sorted(message),
        "outcome": "failed" if failing else "ok",
    }
    line = json.dumps(record, sort_keys=True) + "\n"
    # One write() of one line on an O_APPEND descriptor: lines from concurrent requests never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    if failing:
        raise RuntimeError(f"probe: failing delivery of message {message.get('messageId')} on purpose")
