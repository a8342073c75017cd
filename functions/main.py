"""Cloud Functions entry points. Thin: each hands the request to shared.web with the instance's
adapters (built once per instance by shared.bootstrap)."""

from __future__ import annotations

import flask
import functions_framework
from cloudevents.http import CloudEvent

from shared import bootstrap, web


@functions_framework.http
def schedule_message(request: flask.Request) -> web.Response:
    """POST: schedule a message for a user (agents). GET /messages/<id>: its status."""
    return web.schedule_message(request, bootstrap.container())


@functions_framework.http
def deliver_message(request: flask.Request) -> web.Response:
    """POST {"messageId", "generation"}: deliver one message if allowed now (Cloud Tasks)."""
    return web.deliver_message(request, bootstrap.container())


@functions_framework.cloud_event
def sweep_queue(cloud_event: CloudEvent) -> None:
    """Pub/Sub messagePublished (Cloud Scheduler, every minute): catch what Cloud Tasks missed."""
    web.sweep_event(cloud_event.get("id"), bootstrap.container())


@functions_framework.http
def process_queue(request: flask.Request) -> web.Response:
    """POST: one sweep now, answering its counts (operators)."""
    return web.process_queue(request, bootstrap.container())


@functions_framework.http
def health(request: flask.Request) -> web.Response:
    """GET: queue stats; 503 with a reason if the database is down or the sweep is stale."""
    return web.health(request, bootstrap.container())


@functions_framework.http
def twilio_inbound(request: flask.Request) -> web.Response:
    """POST (Twilio, signed): an SMS from a user; STOP/START/HELP; answers empty TwiML."""
    return web.twilio_inbound(request, bootstrap.container())


@functions_framework.http
def twilio_status(request: flask.Request) -> web.Response:
    """POST (Twilio, signed): a delivery receipt for an outbound message."""
    return web.twilio_status(request, bootstrap.container())
