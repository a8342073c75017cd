"""Cloud Functions entry points. Thin: each hands the request to shared.web with the instance's
adapters (built once per instance by shared.bootstrap)."""

from __future__ import annotations

import flask
import functions_framework

from shared import bootstrap, web


@functions_framework.http
def schedule_message(request: flask.Request) -> web.Response:
    """POST: schedule a message for a user (agents). GET /messages/<id>: its status."""
    return web.schedule_message(request, bootstrap.container())


@functions_framework.http
def deliver_message(request: flask.Request) -> web.Response:
    """POST {"messageId", "generation"}: deliver one message if allowed now (Cloud Tasks)."""
    return web.deliver_message(request, bootstrap.container())
