"""Twilio adapter of the SmsSender port.

Twilio's and requests' exceptions stop here: callers only ever see PermanentSendError (never retry: the
number is invalid, unreachable or opted out; RecipientOptedOut, a PermanentSendError, when Twilio
says the recipient unsubscribed) or TransientSendError (retry later with backoff).

A TransientSendError with `maybe_sent` means the request may have reached Twilio and been accepted: a
read timeout, a connection dropped after the request went out, an unreadable success answer, or any
5xx (Twilio's edge answers 502/503/504 for requests its API may still have processed, and Twilio says
of 500 on a message create that a retry may send it twice: https://www.twilio.com/docs/errors/20500).
The caller should reconcile (list the recipient's messages) before sending again, or it may send twice.
Only answers that prove nothing was created give the claim back: a 4xx (refusals, 401/403, 429) and a
connection that was never made (refused, unresolvable, connect timeout).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import MaxRetryError, NewConnectionError

from shared.errors import PermanentSendError, RecipientOptedOut, SendError, TransientSendError
from shared.models import SentRecord
from shared.segments import smart_encode

log = logging.getLogger(__name__)

# Refused on create for a reason that retrying will not change: invalid number (21211), not a mobile
# number (21614), unsubscribed/STOP (21610), region not enabled (21408), unreachable from our sender
# (21612), sender cannot reach this destination (21606), body over 1600 characters (21617).
PERMANENT_CODES = frozenset({21211, 21614, 21610, 21408, 21612, 21606, 21617})
# 21610 also says why: the recipient unsubscribed (replied STOP to Twilio, or Advanced Opt-Out), so it
# is raised as RecipientOptedOut and the caller opts the user out here too.
UNSUBSCRIBED_CODE = 21610
RATE_LIMITED_CODE = 20429
# Reconciliation looks at the recipient's newest messages, accepted no earlier than the claim less
# this much (Twilio's clock against ours).
RECONCILE_LIST_LIMIT = 50
RECONCILE_CLOCK_SKEW = timedelta(minutes=2)

# Pseudo provider codes for failures that never produced a Twilio answer.
CONNECT_TIMEOUT = "connect_timeout"  # no connection was made: certainly not sent
CONNECT_FAILED = "connect_failed"  # refused or unresolvable: no request went out, certainly not sent
TIMEOUT = "timeout"  # sent, no answer in time
CONNECTION_ERROR = "connection_error"  # the connection broke after the request may have gone out
REQUEST_ERROR = "request_error"
BAD_RESPONSE = "bad_response"  # a 2xx we could not read
CLIENT_ERROR = "twilio_client_error"
# Of those, the ones after which Twilio may hold the message (`maybe_sent`); so may it after any 5xx.
OUTCOME_UNKNOWN_CODES = frozenset({TIMEOUT, CONNECTION_ERROR, REQUEST_ERROR, BAD_RESPONSE})

# The twilio library logs every request and response at INFO, including list filters such as the
# recipient's number; give it its own logger, quiet unless someone asks for it.
_http_log = logging.getLogger(__name__ + ".http")
if _http_log.level == logging.NOTSET:
    _http_log.setLevel(logging.WARNING)


def build_twilio_client(
    account_sid: str,
    auth_token: str,
    *,
    base_url: str | None = None,
    timeout_seconds: int = 10,
) -> Client:
    """A twilio Client with a request timeout, optionally pointed at a Twilio-compatible local server.

    `timeout_seconds` bounds the connect and each read (requests semantics), not the whole call.
    No HTTP-level retries: a retried POST can send the SMS twice; retries belong to the task queue.
    """
    if timeout_seconds <= 0:
        raise ValueError("timeout_seconds must be positive")
    http_client = TwilioHttpClient(timeout=float(timeout_seconds), logger=_http_log)
    client = Client(account_sid, auth_token, http_client=http_client)
    if base_url:
        # Messages live on the `api` domain; its base_url is the only host the request path uses.
        client.api.base_url = base_url.rstrip("/")
        # TWILIO_EDGE / TWILIO_REGION in the environment would rewrite the host into
        # "<product>.<edge>.<region>.twilio.com" form, mangling a local URL.
        client.edge = None
        client.region = None
    return client


class TwilioSender:
    """Sends one SMS per call through Twilio's Messages API."""

    def __init__(
        self,
        client: Client,
        *,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
    ) -> None:
        if bool(from_number) == bool(messaging_service_sid):
            raise ValueError("set exactly one of from_number and messaging_service_sid")
        self._client = client
        self._from_number = from_number
        self._messaging_service_sid = messaging_service_sid
        self._status_callback = status_callback

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        params: dict[str, Any] = {"to": to, "body": body}
        if self._from_number:
            params["from_"] = self._from_number
        else:
            params["messaging_service_sid"] = self._messaging_service_sid
        if self._status_callback:
            params["status_callback"] = status_callback_url(self._status_callback, message_id)

        try:
            message = self._client.messages.create(**params)
        except (TwilioException, requests.RequestException, ValueError) as exc:
            error = classify(exc)
            log.warning(
                "sms send failed",
                extra={
                    "message_id": str(message_id),
                    "provider_code": error.provider_code,
                    "provider_status": error.provider_status,
                    "permanent": isinstance(error, PermanentSendError),
                    "maybe_sent": getattr(error, "maybe_sent", False),
                },
            )
            raise error from exc

        sid = getattr(message, "sid", None)
        if not isinstance(sid, str) or not sid:
            # Twilio answered 2xx, so the message was probably accepted; we just cannot tell which one.
            raise _transient("Twilio accepted the request but returned no message sid", code=BAD_RESPONSE)
        log.info("sms sent", extra={"message_id": str(message_id), "sid": sid})
        return sid

    def find_sent(self, to: str, body: str, *, since: datetime) -> list[SentRecord]:
        """Messages with this body that Twilio accepted for `to` at or after `since`, newest first.

        Lists by recipient only (newest first): a DateSent filter would miss messages still queued
        at Twilio, which have no date_sent yet. Raises TransientSendError if Twilio cannot be asked.

        The bodies are compared after Smart Encoding (same_text): a Messaging Service with Smart
        Encoding on stores the text it rewrote, curly quotes made straight, not the one we sent.
        The message id we put in the StatusCallback URL would be the better key, but Twilio's
        Message resource does not return its status_callback (fetch or list), so it cannot be
        matched here; the recipient, the normalised text and the window since the claim are what
        the list offers.
        """
        try:
            candidates = self._client.messages.list(to=to, limit=RECONCILE_LIST_LIMIT)
        except (TwilioException, requests.RequestException, ValueError) as exc:
            raise classify(exc) from exc
        floor = since - RECONCILE_CLOCK_SKEW
        found: list[SentRecord] = []
        for m in candidates:
            created = getattr(m, "date_created", None) or getattr(m, "date_sent", None)
            theirs = getattr(m, "body", None)
            if (
                not isinstance(theirs, str)
                or not same_text(theirs, body)
                or not isinstance(created, datetime)
            ):
                continue
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            if created < floor:
                continue
            if getattr(m, "status", None) in ("failed", "undelivered", "canceled"):
                continue
            found.append(SentRecord(sid=str(m.sid), sent_at=created))
        return found


def same_text(stored: str, sent: str) -> bool:
    """Whether Twilio's stored Body is the text we sent: equal once both are smart-encoded (the
    look-alikes SMART_ENCODING replaces, the same Twilio's Smart Encoding does, made GSM-7), so a
    rewrite by Twilio still matches while any other difference does not."""
    return stored == sent or smart_encode(stored) == smart_encode(sent)


def status_callback_url(base: str, message_id: uuid.UUID) -> str:
    """The status callback with `message_id` in its query, so a status webhook can find its message even
    when the create call timed out and the sid never reached us. Twilio signs the full URL, query
    included, so signature checks still pass when the webhook validates the URL it was called on."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "message_id"]
    query.append(("message_id", str(message_id)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def classify(exc: BaseException) -> SendError:
    """Map a failure of `messages.create` to Permanent or Transient.

    Anything not known to be permanent is transient: a retry is bounded by MAX_ATTEMPTS and backoff,
    while wrongly calling a failure permanent drops a message nobody will ever resend. That covers
    auth/config errors (401/403) too: they are not this message's fault and heal once config is fixed.
    A transient error's `maybe_sent` says whether Twilio may have created the message anyway.
    """
    if isinstance(exc, requests.RequestException):
        return _request_failure(exc)
    status = getattr(exc, "status", None)
    if isinstance(exc, TwilioException) and isinstance(status, int):
        return _twilio_answer(exc, status)
    if isinstance(exc, TwilioException):
        return TransientSendError(f"Twilio client error: {type(exc).__name__}", code=CLIENT_ERROR)
    # A ValueError from create is the library failing to parse a 2xx body (json.JSONDecodeError).
    return _transient("unreadable answer from Twilio; the message may have been sent", code=BAD_RESPONSE)


# requests' failures that never got an answer, the most specific first: ConnectTimeout is also a
# ConnectionError and a Timeout.
_REQUEST_FAILURES: tuple[tuple[type[requests.RequestException], str, str], ...] = (
    (requests.ConnectTimeout, "timed out connecting to Twilio", CONNECT_TIMEOUT),
    (requests.Timeout, "Twilio did not answer in time; the message may have been sent", TIMEOUT),
    (requests.ConnectionError, "connection to Twilio failed", CONNECTION_ERROR),
)


def _request_failure(exc: requests.RequestException) -> TransientSendError:
    if isinstance(exc, requests.ConnectionError) and _never_connected(exc):
        # urllib3 raises NewConnectionError only while opening the socket (refused, DNS), before a
        # byte of the request is written; a reset or close after that is a plain ConnectionError.
        return TransientSendError("could not connect to Twilio", code=CONNECT_FAILED)
    for kind, reason, code in _REQUEST_FAILURES:
        if isinstance(exc, kind):
            error = TransientSendError(reason, code=code)
            error.maybe_sent = code in OUTCOME_UNKNOWN_CODES
            return error
    return _transient(f"request to Twilio failed: {type(exc).__name__}", code=REQUEST_ERROR)


def _never_connected(exc: BaseException) -> bool:
    """Whether the failure was opening the connection: requests wraps urllib3's MaxRetryError, whose
    `reason` is the NewConnectionError; followed through causes too, whatever the wrapping."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NewConnectionError):
            return True
        nested = [a for a in e.args if isinstance(a, BaseException)]
        if isinstance(e, MaxRetryError) and isinstance(e.reason, BaseException):
            nested.append(e.reason)
        todo.extend(n for n in (*nested, e.__cause__, e.__context__) if n is not None)
    return False


def _transient(reason: str, *, code: str | None = None, status: int | None = None) -> TransientSendError:
    """A transient failure after which Twilio may hold the message (see the module docstring)."""
    error = TransientSendError(reason, code=code, status=status)
    error.maybe_sent = True
    return error


def _twilio_answer(exc: TwilioException, status: int) -> SendError:
    """An error Twilio answered with an HTTP status: TwilioRestException (legacy body) or
    TwilioServiceException (RFC 9457 body)."""
    code = getattr(exc, "code", None)
    # When the body has no code the library puts the HTTP status there instead; that is not a Twilio code.
    twilio_code = code if isinstance(code, int) and code != status else None
    provider_code = str(twilio_code) if twilio_code is not None else None
    if twilio_code == UNSUBSCRIBED_CODE:
        return RecipientOptedOut(_twilio_message(exc), code=provider_code, status=status)
    if _is_permanent(twilio_code, status):
        return PermanentSendError(_twilio_message(exc), code=provider_code, status=status)
    if status >= 500:
        # A 5xx proves nothing about the message: 502/503/504 come from Twilio's edge, which may have
        # passed the request on, and a 500 on create "may" have sent it (Twilio's 20500 page). Only
        # Twilio's list can tell; a 4xx (401/403, 429 included) is a refusal before any message exists.
        return _transient(_twilio_message(exc), code=provider_code, status=status)
    return TransientSendError(_twilio_message(exc), code=provider_code, status=status)


def _is_permanent(twilio_code: int | None, status: int) -> bool:
    if twilio_code in PERMANENT_CODES:
        return True
    if twilio_code == RATE_LIMITED_CODE or status == 429 or status >= 500:
        return False
    # A 400 or 404 naming a Twilio code refuses this request; without one it is not known to be permanent.
    return status in (400, 404) and twilio_code is not None


def _twilio_message(exc: BaseException) -> str:
    # Twilio's error text names the number at most, never credentials; keep it for the failure reason.
    text = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None)
    return str(text) if text else f"Twilio error {getattr(exc, 'status', '')}".strip()
