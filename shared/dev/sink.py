"""A local Twilio-compatible SMS sink: the real `twilio` client talks to it instead of api.twilio.com.

It speaks just enough of the 2010-04-01 Messages API for what the orchestrator does: create a message,
fetch one, and list them filtered by To/From/DateSent. Everything accepted is recorded (in memory and,
optionally, as JSON lines in a file) so tests and `make dev` can see what "was sent".

Twilio's magic test numbers fail the way Twilio documents them, and a small control API under
`/_sink/` lets tests inject failures (HTTP errors, rate limits, slow answers, dropped connections,
and lost answers: the message created, then an error or nothing at all) into the next sends.
`smart_encoding=True` rewrites the bodies sent through a Messaging Service as Twilio's Smart Encoding
does (curly quotes, dashes, ellipsis, odd spaces), storing and listing the rewritten text:

    POST   /_sink/faults    {"status": 500, "code": 20500, "count": 1, "to": "+1...", "delay_seconds": 2,
                             "accept": false, "drop": false}
                            ({"accept": true, "delay_seconds": 5}: created at once, answered 5 s later)
    DELETE /_sink/faults
    GET    /_sink/messages[?to=+1...]
    DELETE /_sink/messages
    GET    /_sink/health

With `status_callbacks=True` (`--status-callbacks`) it also plays Twilio's status callbacks: after
accepting a message that names a StatusCallback, it POSTs `sent` and then `delivered` there, as form
fields Twilio sends (MessageSid, MessageStatus, To, From, AccountSid, ...; ErrorCode when it failed),
signed with X-Twilio-Signature by the auth token. The outcome can be switched, for every destination
or one number, until cleared:

    POST   /_sink/outcomes  {"status": "undelivered", "error_code": 30006, "to": "+1..."}
                            (status delivered, undelivered or failed; to omitted: every number)
    GET    /_sink/outcomes
    DELETE /_sink/outcomes
    GET    /_sink/callbacks (what was posted, and what the webhook answered)

In-process (tests):  `with SmsSink() as sink: client.api.base_url = sink.url ...`
As a process:        `python -m shared.dev.sink --port 8089 [--record FILE]`

Stdlib only, so it starts anywhere the package is importable.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import operator
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlencode, urlsplit
from urllib.request import Request, urlopen

log = logging.getLogger("shared.dev.sink")

API_VERSION = "2010-04-01"
_MESSAGES = re.compile(rf"^/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages\.json$")
_MESSAGE = re.compile(rf"^/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages/(?P<sid>[^/]+)\.json$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")

# Twilio's documented magic "To" numbers (test credentials): each fails on create with this code.
MAGIC_NUMBERS: dict[str, tuple[int, str]] = {
    "+15005550001": (21211, "The 'To' number {to} is not a valid phone number."),
    "+15005550002": (
        21612,
        "The 'To' phone number: {to}, is not currently reachable using the 'From' phone number via SMS.",
    ),
    "+15005550003": (
        21408,
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.",
    ),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number {to} is not a valid mobile number"),
}

# A few of Twilio's Smart Encoding replacements (https://www.twilio.com/docs/messaging/services#smart-encoding),
# kept here rather than imported so the sink plays Twilio, not the code under test.
SMART_ENCODING = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)

# The codes Twilio puts in its error body when a fault names only an HTTP status.
_DEFAULT_CODES = {401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}

_DEFAULT_PAGE_SIZE = 50
_MAX_PAGE_SIZE = 1000
_SECOND = "%Y-%m-%dT%H:%M:%S"


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc2822(moment: datetime | None) -> str | None:
    # Twilio's resources carry RFC 2822 dates ("Mon, 23 Nov 2026 19:34:00 +0000"); the client parses them.
    return format_datetime(moment) if moment is not None else None


def _error_body(status: int, code: int | None, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}" if code is not None else None,
        "status": status,
    }


@dataclass
class Fault:
    """Makes the next `count` matching sends fail with `status`/`code`, after `delay_seconds`.

    A fault with only a delay answers normally, late: the message is recorded even if the client has
    already given up, which is exactly the ambiguous timeout a real provider can produce.

    `accept`: the message is created (recorded, listed) first and only then the error answered, as
    when Twilio's edge answers 502/504 for a request its API did process. `drop`: no answer at all,
    the connection is closed after the request was read (with `accept`, after creating it).
    `accept` with only a delay: created at once, answered normally after the delay (a sender that
    dies while it waits has had its message accepted, and never learns the sid).
    """

    status: int | None = None
    code: int | None = None
    count: int = 1
    to: str | None = None
    delay_seconds: float = 0.0
    message: str | None = None
    accept: bool = False
    drop: bool = False

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        if not isinstance(data, dict):
            raise ValueError("fault must be a JSON object")
        unknown = set(data) - {"status", "code", "count", "to", "delay_seconds", "message", "accept", "drop"}
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        status = data.get("status")
        code = data.get("code")
        count = data.get("count", 1)
        to = data.get("to")
        delay = data.get("delay_seconds", 0.0)
        message = data.get("message")
        accept = data.get("accept", False)
        drop = data.get("drop", False)
        if not isinstance(accept, bool) or not isinstance(drop, bool):
            raise ValueError("accept and drop must be booleans")
        if drop and status is not None:
            raise ValueError("a dropped connection has no status")
        if accept and status is None and not drop and delay == 0:
            raise ValueError("accept needs a status, a drop or a delay")
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise ValueError("status must be an HTTP error status (400-599)")
        if code is not None and not isinstance(code, int):
            raise ValueError("code must be an integer")
        if not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive integer")
        if to is not None and not isinstance(to, str):
            raise ValueError("to must be a string")
        if not isinstance(delay, int | float) or delay < 0:
            raise ValueError("delay_seconds must be a non-negative number")
        if message is not None and not isinstance(message, str):
            raise ValueError("message must be a string")
        if status is None and delay == 0 and not drop:
            raise ValueError("a fault needs a status, a delay_seconds, a drop, or some of them")
        if code is not None and status is None:
            raise ValueError("code needs a status")
        return cls(
            status=status,
            code=code,
            count=count,
            to=to,
            delay_seconds=float(delay),
            message=message,
            accept=accept,
            drop=drop,
        )


OUTCOMES = ("delivered", "undelivered", "failed")
# What a failed outcome says when no code is given: 30006 "landline or unreachable carrier",
# 30008 "unknown error".
_DEFAULT_OUTCOME_CODES = {"undelivered": 30006, "failed": 30008}


@dataclass(frozen=True)
class Outcome:
    """How the messages to `to` (None: to any number) end: the last status callback they get."""

    status: str = "delivered"
    error_code: int | None = None
    to: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Outcome:
        if not isinstance(data, dict):
            raise ValueError("outcome must be a JSON object")
        unknown = set(data) - {"status", "error_code", "to"}
        if unknown:
            raise ValueError(f"unknown outcome field(s): {', '.join(sorted(unknown))}")
        status = data.get("status")
        if status not in OUTCOMES:
            raise ValueError(f"status must be one of {', '.join(OUTCOMES)}")
        code = data.get("error_code")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            raise ValueError("error_code must be an integer")
        if status == "delivered" and code is not None:
            raise ValueError("a delivered message has no error_code")
        to = data.get("to")
        if to is not None and (not isinstance(to, str) or not _E164.match(to)):
            raise ValueError("to must be an E.164 number (+15551234567)")
        if code is None:
            code = _DEFAULT_OUTCOME_CODES.get(status)
        return cls(status=status, error_code=code, to=to)


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """X-Twilio-Signature as Twilio computes it: HMAC-SHA1 of the URL followed by every POST field's
    name and value in name order, base64. Written out here (not twilio's RequestValidator) so the
    sink plays Twilio rather than reusing the code under test."""
    payload = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class SinkMessage:
    """One accepted message, as the sink recorded it."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    received_at: datetime

    def record(self) -> dict[str, Any]:
        """The JSON form used by /_sink/messages, the record file and the CLI log."""
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "to": self.to,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "body": self.body,
            "status_callback": self.status_callback,
            "received_at": self.received_at.isoformat(),
        }

    def callback_form(self, status: str, error_code: int | None) -> dict[str, str]:
        """The form fields of Twilio's status callback for this message at `status`."""
        form = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": self.from_ or "",
            "MessageSid": self.sid,
            "MessageStatus": status,
            "SmsSid": self.sid,
            "SmsStatus": status,
            "To": self.to,
        }
        if self.messaging_service_sid is not None:
            form["MessagingServiceSid"] = self.messaging_service_sid
        if error_code is not None:
            form["ErrorCode"] = str(error_code)
        return form

    def resource(self, *, status: str, sent: bool, error_code: int | None = None) -> dict[str, Any]:
        """The message as Twilio's API shows it."""
        created = _rfc2822(self.received_at)
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": created,
            "date_sent": created if sent else None,
            "date_updated": created,
            "direction": "outbound-api",
            "error_code": error_code,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(max(1, -(-len(self.body) // 160))),
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": status,
            "subresource_uris": {
                "media": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}/Media.json"
            },
            "to": self.to,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}.json",
        }


def _form(body: bytes) -> dict[str, str]:
    fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    return {key: values[-1] for key, values in fields.items()}


class _State:
    """Everything the request threads share, behind one lock."""

    def __init__(self, record_path: Path | None, on_message: Callable[[SinkMessage], None] | None) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.messages: list[SinkMessage] = []
        self.faults: list[Fault] = []
        self.outcomes: dict[str | None, Outcome] = {}
        # sid -> (status, error code) of the last status callback posted for it
        self.statuses: dict[str, tuple[str, int | None]] = {}
        self.callbacks: list[dict[str, Any]] = []
        self.record_path = record_path
        self.on_message = on_message
        self.stopping = threading.Event()

    def take_fault(self, to: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.to is None or fault.to == to:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def add(self, message: SinkMessage) -> None:
        with self.lock:
            self.messages.append(message)
            if self.record_path is not None:
                with self.record_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(message.record()) + "\n")
            self.changed.notify_all()
        if self.on_message is not None:
            self.on_message(message)

    def outcome_for(self, to: str) -> Outcome:
        with self.lock:
            return self.outcomes.get(to) or self.outcomes.get(None) or Outcome()

    def status_of(self, sid: str) -> tuple[str, int | None]:
        with self.lock:
            return self.statuses.get(sid, ("sent", None))

    def snapshot(self) -> list[SinkMessage]:
        with self.lock:
            return list(self.messages)


def _post_signed(url: str, form: dict[str, str], token: str | None) -> int | str:
    """POST `form` to `url` as Twilio does; the HTTP status, or why there was none."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "TwilioProxy/1.1"}
    if token:
        headers["X-Twilio-Signature"] = twilio_signature(token, url, form)
    request = Request(url, data=urlencode(form).encode(), headers=headers, method="POST")
    try:
        with urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except HTTPError as err:
        return err.code
    except (URLError, OSError) as err:
        return f"unreachable: {err}"


def _play_status_callbacks(server: _Server, message: SinkMessage) -> None:
    """`sent`, then the outcome (`failed` alone: it never left), each after the callback delay."""
    assert message.status_callback is not None
    outcome = server.state.outcome_for(message.to)
    steps = ["failed"] if outcome.status == "failed" else ["sent", outcome.status]
    for status in steps:
        if server.state.stopping.wait(server.callback_delay):
            return
        code = outcome.error_code if status == outcome.status else None
        with server.state.lock:
            server.state.statuses[message.sid] = (status, code)
        answer = _post_signed(
            message.status_callback, message.callback_form(status, code), server.signing_token
        )
        record = {
            "sid": message.sid,
            "to": message.to,
            "status": status,
            "error_code": code,
            "answer": answer,
        }
        with server.state.lock:
            server.state.callbacks.append(record)
        log.info("status callback %s", record)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State
    credentials: tuple[str, str] | None
    smart_encoding: bool
    status_callbacks: bool
    callback_delay: float
    signing_token: str | None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "SmsSink/1.0"

    # --- plumbing -----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, code: int | None, message: str) -> None:
        self._send_json(status, _error_body(status, code, message))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _authenticated(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return False
        try:
            username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep or not username:
            return False
        expected = self.server.credentials
        if expected is None:
            return True
        return secrets.compare_digest(username, expected[0]) and secrets.compare_digest(password, expected[1])

    def _require_auth(self) -> bool:
        if self._authenticated():
            return True
        self._send_json(
            401,
            _error_body(401, 20003, "Authenticate"),
            headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
        )
        return False

    # --- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/_sink/health":
            self._send_json(200, {"status": "ok"})
        elif url.path == "/_sink/messages":
            to = query.get("to")
            records = [m.record() for m in self.server.state.snapshot() if to is None or m.to == to]
            self._send_json(200, {"messages": records})
        elif url.path == "/_sink/faults":
            with self.server.state.lock:
                faults = [vars(f).copy() for f in self.server.state.faults]
            self._send_json(200, {"faults": faults})
        elif url.path == "/_sink/outcomes":
            with self.server.state.lock:
                outcomes = [vars(o).copy() for o in self.server.state.outcomes.values()]
            self._send_json(200, {"outcomes": outcomes})
        elif url.path == "/_sink/callbacks":
            with self.server.state.lock:
                callbacks = list(self.server.state.callbacks)
            self._send_json(200, {"callbacks": callbacks})
        elif match := _MESSAGES.match(url.path):
            if self._require_auth():
                self._list(match["account"], query)
        elif match := _MESSAGE.match(url.path):
            if self._require_auth():
                self._fetch(match["account"], match["sid"])
        else:
            self._send_error(404, 20404, f"The requested resource {url.path} was not found")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        # Read the body before any answer: closing with unread bytes can reset the client's connection.
        body = self._read_body()
        if url.path == "/_sink/faults":
            self._add_fault(body)
        elif url.path == "/_sink/outcomes":
            self._set_outcome(body)
        elif match := _MESSAGES.match(url.path):
            if self._require_auth():
                self._create(match["account"], _form(body))
        else:
            self._send_error(404, 20404, f"The requested resource {url.path} was not found")

    def do_DELETE(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        if path == "/_sink/faults":
            with state.lock:
                state.faults.clear()
            self._send_json(200, {"faults": []})
        elif path == "/_sink/outcomes":
            with state.lock:
                state.outcomes.clear()
            self._send_json(200, {"outcomes": []})
        elif path == "/_sink/messages":
            with state.lock:
                state.messages.clear()
            self._send_json(200, {"messages": []})
        else:
            self._send_error(404, 20404, f"The requested resource {path} was not found")

    # --- the control API ----------------------------------------------------------------------

    def _add_fault(self, body: bytes) -> None:
        try:
            fault = Fault.from_json(json.loads(body or b"null"))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            self._send_json(400, {"error": str(exc)})
            return
        with self.server.state.lock:
            self.server.state.faults.append(fault)
        self._send_json(201, {"fault": vars(fault)})

    def _set_outcome(self, body: bytes) -> None:
        try:
            outcome = Outcome.from_json(json.loads(body or b"null"))
        except ValueError as exc:
            self._send_json(400, {"error": str(exc)})
            return
        with self.server.state.lock:
            self.server.state.outcomes[outcome.to] = outcome
        self._send_json(201, {"outcome": vars(outcome)})

    def _accept(self, message: SinkMessage) -> None:
        """Record the message; Twilio's status callbacks for it follow on their own thread."""
        self.server.state.add(message)
        if self.server.status_callbacks and message.status_callback:
            threading.Thread(
                target=_play_status_callbacks, args=(self.server, message), name="sink-callbacks", daemon=True
            ).start()

    # --- the Twilio API -----------------------------------------------------------------------

    def _create(self, account_sid: str, form: dict[str, str]) -> None:
        to = form.get("To", "").strip()
        from_ = form.get("From", "").strip() or None
        service = form.get("MessagingServiceSid", "").strip() or None
        body = form.get("Body", "")
        callback = form.get("StatusCallback") or None

        fault = self.server.state.take_fault(to)
        if fault is not None and fault.accept and fault.status is None and not fault.drop:
            # Accepted now, answered late: the message exists while its sender still waits.
            refusal = _refusal(to, from_, service, body, form)
            if refusal is not None:
                self._send_error(400, *refusal)
                return
            message = self._message(account_sid, to, from_, service, body, callback)
            self._accept(message)
            if not self.server.state.stopping.wait(fault.delay_seconds):
                self._send_json(201, message.resource(status="queued", sent=False))
            return
        # The wait is interruptible, so stop() never hangs on a slow-answer fault.
        if (
            fault is not None
            and fault.delay_seconds > 0
            and self.server.state.stopping.wait(fault.delay_seconds)
        ):
            return
        if fault is not None and (fault.status is not None or fault.drop):
            if fault.accept and _refusal(to, from_, service, body, form) is None:
                self._accept(self._message(account_sid, to, from_, service, body, callback))
            if fault.drop:
                # Closed without a byte of answer: the client sees the connection dropped mid-request.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            assert fault.status is not None
            code = fault.code if fault.code is not None else _DEFAULT_CODES.get(fault.status)
            text = fault.message or f"Injected fault: HTTP {fault.status}"
            headers = {"Retry-After": "1"} if fault.status in (429, 503) else None
            self._send_json(fault.status, _error_body(fault.status, code, text), headers=headers)
            return

        refusal = _refusal(to, from_, service, body, form)
        if refusal is not None:
            self._send_error(400, *refusal)
            return
        message = self._message(account_sid, to, from_, service, body, callback)
        self._accept(message)
        # Like Twilio, the create answer says "queued" and has no date_sent yet; fetch/list say "sent".
        self._send_json(201, message.resource(status="queued", sent=False))

    def _message(
        self,
        account_sid: str,
        to: str,
        from_: str | None,
        service: str | None,
        body: str,
        callback: str | None,
    ) -> SinkMessage:
        if service is not None and self.server.smart_encoding:
            # Smart Encoding belongs to the Messaging Service: Twilio stores (and lists) what it sent.
            body = body.translate(SMART_ENCODING)
        return SinkMessage(
            sid="SM" + secrets.token_hex(16),
            account_sid=account_sid,
            to=to,
            from_=from_,
            messaging_service_sid=service,
            body=body,
            status_callback=callback,
            received_at=_now(),
        )

    def _fetch(self, account_sid: str, sid: str) -> None:
        for message in self.server.state.snapshot():
            if message.sid == sid and message.account_sid == account_sid:
                status, code = self.server.state.status_of(sid)
                self._send_json(200, message.resource(status=status, sent=True, error_code=code))
                return
        self._send_error(404, 20404, f"The requested resource {self.path} was not found")

    def _shown(self, message: SinkMessage) -> dict[str, Any]:
        status, code = self.server.state.status_of(message.sid)
        return {"status": status, "sent": True, "error_code": code}

    def _list(self, account_sid: str, query: dict[str, str]) -> None:
        try:
            predicate = _list_filter(query)
            page = int(query.get("Page", "0"))
            page_size = min(int(query.get("PageSize", str(_DEFAULT_PAGE_SIZE))), _MAX_PAGE_SIZE)
            if page < 0 or page_size < 1:
                raise ValueError("Page and PageSize must be positive")
        except ValueError as exc:
            self._send_error(400, 20001, str(exc))
            return

        matching = [m for m in self.server.state.snapshot() if m.account_sid == account_sid and predicate(m)]
        matching.sort(key=lambda m: m.received_at, reverse=True)  # Twilio lists newest first
        start = page * page_size
        chunk = matching[start : start + page_size]
        base = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def page_uri(number: int) -> str:
            params = {**filters, "PageSize": str(page_size), "Page": str(number)}
            if number > 0:
                params["PageToken"] = f"PA{number}"
            return f"{base}?{urlencode(params)}"

        has_next = start + page_size < len(matching)
        self._send_json(
            200,
            {
                "messages": [m.resource(**self._shown(m)) for m in chunk],
                "end": start + len(chunk) - 1 if chunk else 0,
                "first_page_uri": page_uri(0),
                "next_page_uri": page_uri(page + 1) if has_next else None,
                "page": page,
                "page_size": page_size,
                "previous_page_uri": page_uri(page - 1) if page > 0 else None,
                "start": start,
                "uri": page_uri(page),
            },
        )


def _refusal(
    to: str, from_: str | None, service: str | None, body: str, form: dict[str, str]
) -> tuple[int, str] | None:
    """Twilio's create checks, in Twilio's order: the (code, text) of the first that refuses."""
    if not to:
        return 21604, "A 'To' phone number is required."
    if from_ is None and service is None:
        return 21603, "A 'From' phone number is required."
    if not body and not form.get("MediaUrl") and not form.get("ContentSid"):
        return 21602, "Message body is required."
    if to in MAGIC_NUMBERS:
        code, template = MAGIC_NUMBERS[to]
        return code, template.format(to=to)
    if not _E164.match(to):
        return 21211, f"The 'To' number {to} is not a valid phone number."
    if len(body) > 1600:
        return 21617, "The concatenated message body exceeds the 1600 character limit."
    return None


def _sent_key(value: str) -> Callable[[SinkMessage], str]:
    """How to compare a message against a DateSent filter value: by day for YYYY-MM-DD, by second for a
    timestamp (the client serialises datetimes as YYYY-MM-DDTHH:MM:SSZ). Both sides become strings in
    one ISO format, which order correctly."""
    if len(value) == 10:
        date.fromisoformat(value)  # validates
        return lambda m: m.received_at.date().isoformat()
    return lambda m: m.received_at.strftime(_SECOND)


def _date_check(bound: str, compare: Callable[[str, str], bool]) -> Callable[[SinkMessage], bool]:
    sent = _sent_key(bound)
    return lambda m: bool(compare(sent(m), bound))


def _normalise_when(value: str) -> str:
    value = value.strip()
    if len(value) == 10:
        return date.fromisoformat(value).isoformat()
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(_SECOND)


def _list_filter(query: dict[str, str]) -> Callable[[SinkMessage], bool]:
    """Twilio's list filters. The client sends `DateSent>` / `DateSent<` as the *key*: in the query
    string that reads `DateSent>=2026-11-23...`, which is why both bounds are inclusive."""
    checks: list[Callable[[SinkMessage], bool]] = []
    if to := query.get("To"):
        checks.append(lambda m: m.to == to)
    if from_ := query.get("From"):
        checks.append(lambda m: m.from_ == from_)
    for key, compare in (
        ("DateSent", operator.eq),
        ("DateSent>", operator.ge),
        ("DateSent<", operator.le),
    ):
        raw = query.get(key, "").strip()
        if not raw:
            continue
        checks.append(_date_check(_normalise_when(raw), compare))
    return lambda m: all(c(m) for c in checks)


class SmsSink:
    """The sink on a background thread; `port=0` picks a free port (see `.url`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record_path: str | Path | None = None,
        account_sid: str | None = None,
        auth_token: str | None = None,
        on_message: Callable[[SinkMessage], None] | None = None,
        smart_encoding: bool = False,
        status_callbacks: bool = False,
        callback_delay: float = 0.2,
    ) -> None:
        """`account_sid`/`auth_token`, when both given, are required to match the basic auth exactly;
        otherwise any basic auth is accepted (but some must be present, as with Twilio).
        `smart_encoding`: the Messaging Service has Smart Encoding on (bodies sent through it are
        rewritten, see SMART_ENCODING). `status_callbacks`: post Twilio's status callbacks (signed
        with `auth_token` when given), `callback_delay` seconds apart."""
        self._state = _State(Path(record_path) if record_path is not None else None, on_message)
        self._server = _Server((host, port), _Handler)
        self._server.state = self._state
        self._server.credentials = (account_sid, auth_token) if account_sid and auth_token else None
        self._server.smart_encoding = smart_encoding
        self._server.status_callbacks = status_callbacks
        self._server.callback_delay = callback_delay
        self._server.signing_token = auth_token
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> SmsSink:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.01},  # how long stop() may wait
                name="sms-sink",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._state.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> SmsSink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def messages(self, to: str | None = None) -> list[dict[str, Any]]:
        """The recorded messages, oldest first, as `/_sink/messages` shows them."""
        return [m.record() for m in self._state.snapshot() if to is None or m.to == to]

    def wait_for(self, count: int, *, to: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Block until at least `count` messages (to `to`, if given) are recorded; for tests where another
        process or thread does the sending. Returns them; raises TimeoutError with what did arrive."""
        deadline = time.monotonic() + timeout
        with self._state.changed:
            while True:
                found = [m for m in self._state.messages if to is None or m.to == to]
                if len(found) >= count:
                    return [m.record() for m in found]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} message(s), got {len(found)}: {found!r}")
                self._state.changed.wait(remaining)

    def add_fault(
        self,
        *,
        status: int | None = None,
        code: int | None = None,
        count: int = 1,
        to: str | None = None,
        delay_seconds: float = 0.0,
        message: str | None = None,
        accept: bool = False,
        drop: bool = False,
    ) -> None:
        """Same rules as `POST /_sink/faults`."""
        fault = Fault.from_json(
            {
                "status": status,
                "code": code,
                "count": count,
                "to": to,
                "delay_seconds": delay_seconds,
                "message": message,
                "accept": accept,
                "drop": drop,
            }
        )
        with self._state.lock:
            self._state.faults.append(fault)

    def set_outcome(self, status: str, *, error_code: int | None = None, to: str | None = None) -> None:
        """Same rules as `POST /_sink/outcomes`."""
        outcome = Outcome.from_json({"status": status, "error_code": error_code, "to": to})
        with self._state.lock:
            self._state.outcomes[outcome.to] = outcome

    def callbacks(self) -> list[dict[str, Any]]:
        """The status callbacks posted so far, oldest first, as `/_sink/callbacks` shows them."""
        with self._state.lock:
            return list(self._state.callbacks)

    def clear_faults(self) -> None:
        with self._state.lock:
            self._state.faults.clear()

    def clear(self) -> None:
        """Forget recorded messages and pending faults (the record file is left alone)."""
        with self._state.lock:
            self._state.messages.clear()
            self._state.faults.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.dev.sink", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port (printed at start)")
    parser.add_argument("--record", metavar="FILE", help="append every accepted message as a JSON line")
    parser.add_argument("--account-sid", help="require exactly these credentials (default: any basic auth)")
    parser.add_argument("--auth-token")
    parser.add_argument(
        "--smart-encoding", action="store_true", help="rewrite Messaging Service bodies as Twilio would"
    )
    parser.add_argument(
        "--status-callbacks",
        action="store_true",
        help="post signed sent/delivered status callbacks to each message's StatusCallback",
    )
    parser.add_argument("--callback-delay", type=float, default=0.2, help="seconds before each callback")
    args = parser.parse_args(argv)

    def emit(message: SinkMessage) -> None:
        print(json.dumps({"event": "message", **message.record()}), flush=True)

    sink = SmsSink(
        args.host,
        args.port,
        record_path=args.record,
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        on_message=emit,
        smart_encoding=args.smart_encoding,
        status_callbacks=args.status_callbacks,
        callback_delay=args.callback_delay,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sink.start()
    # One parseable line first, so a parent process started with --port 0 can learn the URL.
    print(json.dumps({"event": "listening", "url": sink.url}), flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        sink.stop()
    print(json.dumps({"event": "stopped", "messages": len(sink.messages())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
