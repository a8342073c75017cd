"""A tiny CloudEvent function for tests/integration/test_pubsub_push.py.

Run by functions-framework as a real process (`--signature-type cloudevent --target on_event`). For
every event it appends one JSON line to the file named by $PUBSUB_PROBE_OUT: the CloudEvent's
id, type, source, subject and time, the base64-decoded `data["message"]["data"]` (as text), the
message's attributes, the keys of `data` and of `data["message"]`, and the pid of the worker.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import functions_framework
from cloudevents.http.event import CloudEvent

OUT_ENV = "PUBSUB_PROBE_OUT"


@functions_framework.cloud_event
def on_event(event: CloudEvent) -> None:
    data: Any = event.get_data()
    message: dict[str, Any] = data.get("message", {}) if isinstance(data, dict) else {}
    raw = message.get("data")
    record = {
        "id": event.get("id"),
        "type": event.get("type"),
        "source": event.get("source"),
        "subject": event.get("subject"),
        "time": event.get("time"),
        "data": base64.b64decode(raw).decode("utf-8", errors="replace") if raw is not None else None,
        "attributes": message.get("attributes"),
        "message_id": message.get("messageId"),
        "publish_time": message.get("publishTime"),
        "data_keys": sorted(data) if isinstance(data, dict) else None,
        "message_keys": sorted(message),
        "pid": os.getpid(),
    }
    line = json.dumps(record, sort_keys=True) + "\n"
    # One write() of one line on an O_APPEND descriptor: lines from concurrent requests never interleave.
    fd = os.open(os.environ[OUT_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
