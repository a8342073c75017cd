"""Structured JSON logs that Cloud Logging parses: one object per line with `severity`, `message`
and the fields an operator filters on (messageId, userId, reason), plus the request's trace."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace", default=None)
_configured = False

TRACE_KEY = "logging.googleapis.com/trace"


def set_trace(header: str | None, project: str) -> None:
    """Remember the trace of the current request (X-Cloud-Trace-Context: TRACE_ID/SPAN;o=1)."""
    if not header:
        _trace.set(None)
        return
    trace_id = header.split("/", 1)[0].strip()
    _trace.set(f"projects/{project}/traces/{trace_id}" if trace_id else None)


# json.dumps(entry, default=str, ensure_ascii=False) builds a new encoder on every call (it caches
# only the default one); every request logs at least one line, so this one is built once.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname != "WARNING" else "WARNING",
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if v is not None})
        trace = _trace.get()
        if trace:
            entry[TRACE_KEY] = trace
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


def configure(level: str = "INFO") -> None:
    """Send every log record to stdout as one JSON line (idempotent)."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "twilio.http_client", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True


# A phone number as Twilio and the database write one: E.164 (+15551234567), or a NANP number
# as (555) 123-4567, 555-123-4567 or 555.123.4567; not dates, times, ids or UUIDs.
_PHONE = re.compile(r"\+\d{7,15}\b|(?<![\w-])(?:\(\d{3}\)\s?|\d{3}[.\s-])\d{3}[.\s-]\d{4}(?![\w-])")


def scrub(text: str | None) -> str | None:
    """Error text without personal data, before it is logged or stored: Postgres' DETAIL and
    CONTEXT lines (which quote column values) are dropped, and phone numbers are redacted
    (Twilio's and the database's messages quote the recipient)."""
    if text is None:
        return None
    kept = [line for line in text.splitlines() if not line.lstrip().startswith(("DETAIL:", "CONTEXT:"))]
    return _PHONE.sub("[phone]", "\n".join(kept))


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured fields (None values dropped)."""
    logger.log(level, message, extra={"fields": fields})
