"""A trivial HTTP function for the bench's floor: what functions-framework's app and Flask's test
client cost on their own (parse a JSON body like schedule_message's, answer a JSON body of the same
size), with no use case and no database behind them."""

from __future__ import annotations

import json

import flask
import functions_framework

ANSWER = json.dumps(
    {"success": True, "messageId": "0" * 36, "status": "queued", "reason": "ok"} | {"pad": "x" * 300}
)


@functions_framework.http
def echo(request: flask.Request) -> tuple[str, int, dict[str, str]]:
    body = request.get_json()
    if not isinstance(body, dict):
        return json.dumps({"success": False}), 400, {"Content-Type": "application/json"}
    return ANSWER, 201, {"Content-Type": "application/json"}
