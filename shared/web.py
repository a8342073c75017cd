"""HTTP glue for the entry points: parse the request, call a use case, turn the result or a
domain error into a JSON answer. Never a stack trace or a bare 500 to the caller."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import flask

from shared import identity, service
from shared.answers import (
    cancel_json,
    consent_json,
    health_answer,
    message_json,
    page_json,
    schedule_body,
    timeline_json,
)
from shared.bootstrap import Container
from shared.errors import Forbidden, OrchestratorError, PayloadTooLarge, TooManyRequests, ValidationError
from shared.log import event, scrub, set_trace
from shared.models import SweepReport, iso
from shared.parsing import ScheduleRequest
from shared.small_requests import parse_task

log = logging.getLogger("orchestrator.http")

MAX_BODY_BYTES = 64 * 1024
_MESSAGE_PATH = re.compile(r"^/(?:messages/)?(?P<id>[^/]+)/?$")
_CANCEL_PATH = re.compile(r"^/(?:messages/)?(?P<id>[^/]+)/cancel/?$")
_CONSENT_PATH = re.compile(r"^/users/(?P<id>[^/]+)/consent/?$")
_USER_MESSAGES_PATH = re.compile(r"^/users/(?P<id>[^/]+)/messages/?$")

Response = tuple[str, int, dict[str, str]]


def respond(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    # ASCII escapes: an echoed field name may hold text that is not encodable UTF-8.
    return json.dumps(body, ensure_ascii=True), status, h


def method_not_allowed(allow: str, message: str | None = None) -> Response:
    body = {"success": False, "error": "method_not_allowed", "message": message or f"use {allow}"}
    return respond(405, body, {"Allow": allow})


def _body_bytes(request: flask.Request) -> bytes:
    """The body, at most MAX_BODY_BYTES (64 KiB): a larger one is a 413, refused by its
    Content-Length before it is read when it declares one."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(MAX_BODY_BYTES)
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(MAX_BODY_BYTES)
    return raw


def _json_body(request: flask.Request) -> Any:
    raw = _body_bytes(request)  # the size first: a 20 MB body of any type is a 413
    if request.mimetype != "application/json":
        raise ValidationError(
            [
                {
                    "field": "Content-Type",
                    "reason": f"must be application/json, got {request.mimetype or 'none'!r}",
                }
            ]
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError([{"field": "body", "reason": f"malformed JSON: {exc}"}]) from exc
    except RecursionError as exc:  # nested deeper than the parser's recursion limit
        raise ValidationError([{"field": "body", "reason": "JSON nested too deeply"}]) from exc


def _retry_after(exc: OrchestratorError) -> dict[str, str] | None:
    """When a caller may try again: a rate refusal says when; an outage, in a few seconds."""
    if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
        return {"Retry-After": str(exc.retry_after)}
    return {"Retry-After": "5"} if exc.http_status == 503 else None


def handle(request: flask.Request, c: Container, name: str, fn: Callable[[], Response]) -> Response:
    """Run `fn`, mapping domain errors to their HTTP status; anything unexpected is a logged 500."""
    set_trace(request.headers.get("X-Cloud-Trace-Context"), c.settings.google_cloud_project)
    try:
        return fn()
    except OrchestratorError as exc:
        level = logging.ERROR if exc.http_status >= 500 else logging.INFO
        event(
            log,
            level,
            f"{name}: {exc.code}",
            function=name,
            status=exc.http_status,
            reason=exc.code,
            error=exc.message,
            cause=scrub(repr(exc.__cause__)) if exc.__cause__ else None,
        )
        headers = _retry_after(exc)
        return respond(exc.http_status, exc.to_dict(), headers)
    except Exception:
        log.exception(
            "%s: unexpected error", name, extra={"fields": {"function": name, "reason": "internal_error"}}
        )
        return respond(
            500, {"success": False, "error": "internal_error", "message": "internal error; see logs"}
        )


def _not_a_schedule_path(path: str) -> Response:
    """A POST anywhere but the root is not a schedule: it used to be taken as one, so a POST meant for
    a read-only route (a user's messages or consent) scheduled a message."""
    if _USER_MESSAGES_PATH.match(path) or _CONSENT_PATH.match(path) or _MESSAGE_PATH.match(path):
        return method_not_allowed("GET", f"{path} is read-only: use GET (POST / schedules a message)")
    return respond(404, {"success": False, "error": "not_found", "message": f"no such path: {path}"})


def schedule_message(request: flask.Request, c: Container) -> Response:
    def run() -> Response:
        caller = identity.caller(request.headers.get, c.settings.caller_identity, c.settings.agent_identities)
        if request.method == "GET":
            consent = _CONSENT_PATH.match(request.path)
            if consent:
                query = request.args.to_dict(flat=True)
                history = service.consent_history(consent.group("id"), query, store=c.store, caller=caller)
                return respond(200, {"success": True, **consent_json(history)})
            listing = _USER_MESSAGES_PATH.match(request.path)
            if listing:
                query = request.args.to_dict(flat=True)
                page = service.list_messages(listing.group("id"), query, store=c.store, caller=caller)
                return respond(200, {"success": True, **page_json(page)})
            match = _MESSAGE_PATH.match(request.path)
            if not match:
                return respond(404, {"success": False, "error": "not_found", "message": "GET /messages/<id>"})
            message = service.get_message(match.group("id"), store=c.store, caller=caller)
            return respond(
                200, {"success": True, **message_json(message), "timeline": timeline_json(message)}
            )
        if request.method != "POST":
            return method_not_allowed("GET, POST", "use POST, or GET /messages/<id>")
        cancel = _CANCEL_PATH.match(request.path)
        if cancel:
            # An empty body is allowed: the message id in the path is all a cancel needs.
            has_body = bool(request.content_length) or bool(request.get_data(cache=True))
            cancel_body = _json_body(request) if has_body else None
            cancelled = service.cancel(
                cancel.group("id"), cancel_body, store=c.store, now=c.clock(), caller=caller
            )
            return respond(200, cancel_json(cancelled))
        if request.path.rstrip("/"):
            return _not_a_schedule_path(request.path)
        now = c.clock()
        parsed = ScheduleRequest.parse(
            _json_body(request),
            now=now,
            max_content_length=c.policy.max_content_length,
            idempotency_header=request.headers.get("Idempotency-Key"),
            max_segments=c.policy.max_segments_per_message,
            smart_encoding=c.policy.smart_encoding,
        )
        result = service.schedule_request(
            parsed, store=c.store, tasks=c.tasks, config=c.policy, now=now, renderer=c.renderer, caller=caller
        )
        return respond(201 if result.created else 200, schedule_body(result))

    return handle(request, c, "schedule_message", run)


def deliver_message(request: flask.Request, c: Container) -> Response:
    def run() -> Response:
        if request.method != "POST":
            return method_not_allowed("POST")
        body = _json_body(request)
        parse_task(body)  # a malformed task is a 400 before any adapter is built
        outcome = service.deliver(
            body, store=c.store, tasks=c.tasks, sms=c.sms, config=c.policy, clock=c.clock, renderer=c.renderer
        )
        payload = {
            "success": outcome.action not in ("retry",),
            "messageId": str(outcome.message_id),
            "action": outcome.action,
            "reason": outcome.reason,
            "status": outcome.status,
            "scheduledFor": iso(outcome.scheduled_for),
            "twilioMessageSid": outcome.sid,
            "taskRetryCount": request.headers.get("X-CloudTasks-TaskRetryCount"),
        }
        if outcome.action == "retry":
            # Non-2xx makes Cloud Tasks retry with the queue's backoff.
            return respond(503, payload, {"Retry-After": "10"})
        return respond(200, payload)

    return handle(request, c, "deliver_message", run)


def _sweep(c: Container, trigger: str) -> SweepReport:
    return service.sweep(
        store=c.store,
        tasks=c.tasks,
        sms=c.sms,
        config=c.policy,
        clock=c.clock,
        trigger=trigger,
        events=c.events,
    )


def process_queue(request: flask.Request, c: Container) -> Response:
    def run() -> Response:
        if request.method != "POST":
            return method_not_allowed("POST")
        report = _sweep(c, "http")
        return respond(
            200,
            {
                "success": True,
                "message": "Queue processed successfully",
                "lastProcessTime": iso(c.clock()),
                "counts": report.counts(),
            },
        )

    return handle(request, c, "process_queue", run)


def health(request: flask.Request, c: Container) -> Response:
    def run() -> Response:
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed("GET")
        return respond(*health_answer(service.health(store=c.store, config=c.policy, now=c.clock())))

    return handle(request, c, "health", run)


def sweep_event(event_id: str | None, c: Container) -> None:
    """The sweep_queue CloudEvent: one sweep. A database outage raises, so Pub/Sub redelivers."""
    _sweep(c, f"pubsub:{event_id or '-'}")


# The inline event drain's share of a twilio_inbound answer, its publishes' waits included.
INBOUND_DRAIN_BUDGET_SECONDS = 1.0

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
_TWIML_REPLY = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>{}</Message></Response>'
_LOOPBACK = ("127.0.0.1", "::1")


def public_urls(request: flask.Request, configured: str | None) -> list[str]:
    """The URLs Twilio may have signed for this request.

    Behind Google's front end the function sees http, an internal host and (for gen2 functions on
    cloudfunctions.net) a path without the function's name; Twilio signed the public https URL.
    TWILIO_WEBHOOK_BASE_URL, when set, is that URL exactly; otherwise it is rebuilt from the
    X-Forwarded-* headers the front end adds, with and without the function name (K_SERVICE).
    """
    query = request.query_string.decode()
    suffix = request.path + (f"?{query}" if query else "")
    if configured:
        base = configured.rstrip("/")
        return [base + (suffix if suffix != "/" else ""), base + suffix]
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    urls = [f"{proto}://{host}{suffix}"]
    service_name = os.environ.get("K_SERVICE")
    if service_name:
        urls.append(f"{proto}://{host}/{service_name}{suffix if suffix != '/' else ''}")
    return urls


def _check_twilio_signature(request: flask.Request, c: Container) -> None:
    settings = c.settings
    if settings.twilio_signature_bypass_local and request.remote_addr in _LOOPBACK:
        return  # TWILIO_SIGNATURE_BYPASS=local-only: loopback requests only, for make dev
    signature = request.headers.get("X-Twilio-Signature")
    token = settings.twilio_auth_token
    if not signature or not token:
        raise Forbidden("missing X-Twilio-Signature" if token else "TWILIO_AUTH_TOKEN is not set")
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(token)
    params = request.form.to_dict(flat=True)
    if not any(
        validator.validate(url, params, signature)
        for url in public_urls(request, settings.twilio_webhook_base_url)
    ):
        raise Forbidden("invalid X-Twilio-Signature")


def twiml(reply: str | None = None) -> str:
    """Empty TwiML (Twilio sends nothing), or one reply message, its text XML-escaped."""
    return EMPTY_TWIML if reply is None else _TWIML_REPLY.format(xml_escape(reply))


def _twiml(reply: str | None = None, status: int = 200) -> Response:
    return twiml(reply), status, {"Content-Type": "text/xml"}


def _twilio_webhook(
    request: flask.Request, c: Container, name: str, record: Callable[[dict[str, str]], str | None]
) -> Response:
    """A signed Twilio webhook: POST only, the signature checked, the form recorded; TwiML with the
    reply `record` returns, if any."""

    def run() -> Response:
        if request.method != "POST":
            return method_not_allowed("POST")
        _check_twilio_signature(request, c)
        return _twiml(record(request.form.to_dict(flat=True)))

    return handle(request, c, name, run)


def twilio_inbound(request: flask.Request, c: Container) -> Response:
    def record(form: dict[str, str]) -> str | None:
        result = service.inbound(form, store=c.store, now=c.clock())
        # Agents hear of the reply at once; if Pub/Sub is slow or down the sweep publishes it later.
        # Bounded in time: Twilio gives a webhook 15 s and never retries it, and on Cloud Functions
        # nothing can run after the answer.
        try:
            service.drain_events(
                store=c.store,
                publisher=c.events,
                clock=c.clock,
                limit=20,
                budget_seconds=INBOUND_DRAIN_BUDGET_SECONDS,
                monotonic=c.monotonic,
            )
        except OrchestratorError as exc:
            event(
                log, logging.WARNING, "twilio_inbound: event drain deferred to the sweep", error=exc.message
            )
        # STOP_REPLY, START_REPLY, HELP_REPLY: unset (the default), Twilio answers the keyword itself.
        return c.settings.keyword_reply(result.get("keyword"))

    return _twilio_webhook(request, c, "twilio_inbound", record)


def twilio_status(request: flask.Request, c: Container) -> Response:
    def record(form: dict[str, str]) -> None:
        service.status_callback(form, store=c.store, now=c.clock())

    return _twilio_webhook(request, c, "twilio_status", record)
