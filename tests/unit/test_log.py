"""Logs are one JSON object per line, in the shape Cloud Logging parses."""

from __future__ import annotations

import io
import json
import logging

from shared.log import TRACE_KEY, JsonFormatter, event, set_trace


def _capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.log.json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_an_event_is_one_json_line_with_severity_message_and_fields() -> None:
    logger, stream = _capture()
    set_trace(None, "proj")
    event(
        logger,
        logging.WARNING,
        "deliver: deferred (quiet_hours)",
        messageId="m-1",
        userId="u-1",
        reason="quiet_hours",
        scheduledFor=None,
    )
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["severity"] == "WARNING" and entry["message"] == "deliver: deferred (quiet_hours)"
    assert (entry["messageId"], entry["userId"], entry["reason"]) == ("m-1", "u-1", "quiet_hours")
    assert "scheduledFor" not in entry and TRACE_KEY not in entry


def test_the_request_trace_is_attached() -> None:
    logger, stream = _capture()
    set_trace("105445aa7843bc8bf206b12000100000/1;o=1", "my-project")
    try:
        event(logger, logging.INFO, "message scheduled", messageId="m-2")
    finally:
        set_trace(None, "my-project")
    entry = json.loads(stream.getvalue())
    assert entry[TRACE_KEY] == "projects/my-project/traces/105445aa7843bc8bf206b12000100000"


def test_exceptions_are_logged_as_text_inside_the_json() -> None:
    logger, stream = _capture()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("unexpected", extra={"fields": {"function": "deliver_message"}})
    entry = json.loads(stream.getvalue())
    assert entry["severity"] == "ERROR" and entry["function"] == "deliver_message"
    assert "RuntimeError: boom" in entry["exception"]
