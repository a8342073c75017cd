"""Property-based tests of schedule_message from openapi.yaml (schemathesis): requests generated from
the request schema, valid and invalid, through functions-framework's real app on real Postgres.

Whatever is sent, the answer is never a 5xx, conforms to the schema declared for its status, and every
refusal says what was wrong: `success: false`, an `error` code, a non-empty `message`, and for a 400
every bad field named, with a reason. Three in four generated userIds are mapped to a user that
exists, so requests are scheduled (201), replayed (200) and refused by the policy (409), not only
refused for an unknown user (404).

The requests schemathesis found answered with a 5xx or an unnamed field are kept below as
regression cases (`FOUND`)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from flask import Flask
from functions_framework import create_app
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from shared import bootstrap
from shared.config import Settings
from shared.store.postgres import PostgresStore
from tests.integration.test_openapi import assert_conforms, function_view, load_spec
from tests.support.constants import MAIN
from tests.support.factories import make_user
from tests.support.fakes import RecordingTaskQueue, VirtualClock

SPEC = load_spec()
_EXAMPLE = SPEC["paths"]["/schedule_message"]["post"]["requestBody"]["content"]["application/json"]["example"]
# The user the spec's request example names; it exists, so the examples phase schedules a message.
KNOWN_USER = uuid.UUID(_EXAMPLE["userId"])


def schedule_operation(*modes: GenerationMode) -> OpenApiSchema:
    """schedule_message's POST as the function's own app serves it, generating data in `modes`."""
    loaded = schemathesis.openapi.from_dict(function_view(SPEC, "schedule_message"))
    loaded.config.generation.update(modes=list(modes))
    return loaded.include(method="POST", path="/")


valid_requests = schedule_operation(GenerationMode.POSITIVE)
any_requests = schedule_operation(GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def explained(status: int, body: Any) -> None:
    """A 4xx is a JSON ErrorBody with an error code and a message; a 400 names each bad field."""
    if not 400 <= status < 500:
        return
    assert isinstance(body, dict), f"{status} body is not a JSON object: {body!r}"
    assert body.get("success") is False, f"{status} without success: false: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"], f"{status} without an error code: {body!r}"
    message = body.get("message")
    assert isinstance(message, str) and message.strip(), f"{status} without a message: {body!r}"
    if status == 400:
        errors = body.get("errors")
        assert isinstance(errors, list) and errors, f"400 without errors[]: {body!r}"
        for entry in errors:
            assert isinstance(entry, dict), f"errors[] entry is not an object: {body!r}"
            field = entry.get("field")
            assert isinstance(field, str) and field.strip(), f"400 with an unnamed field: {body!r}"
            reason = entry.get("reason")
            assert isinstance(reason, str) and reason.strip(), f"400 without a reason: {body!r}"


@schemathesis.check
def refusals_are_explained(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx says what was wrong (see `explained`)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError as exc:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.text[:200]!r}") from exc
    explained(response.status_code, body)
    return True


CHECKS = [not_a_server_error, refusals_are_explained, status_code_conformance, response_schema_conformance]


def use_known_user(case: Case) -> None:
    """Point three in four well-formed userIds at the existing user (chosen by a hash of the
    generated value, so a shrunk example keeps its choice); the rest stay unknown (404)."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("userId"), str):
        return
    try:
        uuid.UUID(body["userId"])
    except ValueError:
        return
    if hashlib.sha256(body["userId"].encode("utf-8", "surrogatepass")).digest()[0] % 4:
        body["userId"] = str(KNOWN_USER)


@pytest.fixture
def app(
    store: PostgresStore, tasks: RecordingTaskQueue, clock: VirtualClock, request: pytest.FixtureRequest
) -> Iterator[tuple[Flask, Counter[int]]]:
    """schedule_message's app on one database for the whole run, with the known user in it; after
    a passing run, checks that it scheduled messages and met unknown users."""
    make_user(store, "America/Chicago", id=KNOWN_USER)
    c = bootstrap.Container(Settings(), store=store, tasks=tasks, clock=clock)
    previous = bootstrap.install(c)
    statuses: Counter[int] = Counter()
    failed_before = request.session.testsfailed
    try:
        yield create_app("schedule_message", MAIN), statuses
    finally:
        bootstrap.install(previous)
    if request.session.testsfailed == failed_before:
        assert statuses[201] > 0, f"no request was scheduled: {dict(statuses)}"
        assert statuses[404] > 0, f"no request met an unknown user: {dict(statuses)}"


BOUNDED = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def call_and_check(case: Case, flask_app: Flask, statuses: Counter[int]) -> None:
    use_known_user(case)
    response = case.call_and_validate(app=flask_app, checks=CHECKS)
    statuses[response.status_code] += 1


@valid_requests.parametrize()
@BOUNDED
def test_valid_requests_are_scheduled_or_refused_with_a_reason(
    case: Case, app: tuple[Flask, Counter[int]]
) -> None:
    call_and_check(case, *app)


@any_requests.parametrize()
@BOUNDED
def test_any_request_is_answered_without_a_5xx_and_every_refusal_is_explained(
    case: Case, app: tuple[Flask, Counter[int]]
) -> None:
    call_and_check(case, *app)


# Requests schemathesis found (minimised): each was answered with a 5xx or a 400 naming no field.
_OK = {"userId": "{user}", "agentId": "concierge_agent", "messageData": {"content": "hi"}}
FOUND: dict[str, str] = {
    "nul-in-content": json.dumps(_OK | {"messageData": {"content": "hi\x00"}}),
    "nul-in-agent-id": json.dumps(_OK | {"agentId": "a\x00"}),
    "nul-in-idempotency-key": json.dumps(_OK | {"idempotencyKey": "k\x00"}),
    "nul-in-a-message-data-key": json.dumps(_OK | {"messageData": {"content": "hi", "\x00": 1}}),
    "lone-surrogate-in-agent-id": json.dumps(_OK | {"agentId": "a\ud800"}),
    "lone-surrogate-in-an-unknown-field": json.dumps(_OK | {"\ud800": 1}),
    "expires-after-year-9999-in-utc": json.dumps(_OK | {"expiresAt": "9999-12-31T23:59:59-01:00"}),
    "unknown-field-with-an-empty-name": json.dumps(_OK | {"": 1}),
}


@pytest.mark.parametrize("raw", FOUND.values(), ids=FOUND.keys())
def test_requests_schemathesis_found_are_refused_with_a_named_field(
    app: tuple[Flask, Counter[int]], raw: str
) -> None:
    flask_app, statuses = app
    statuses.update([201, 404])  # a single request: the run-level expectations do not apply
    resp = flask_app.test_client().post(
        "/", data=raw.replace("{user}", str(KNOWN_USER)).encode(), content_type="application/json"
    )
    assert resp.status_code < 500, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json", resp.get_data(as_text=True)
    explained(resp.status_code, resp.get_json())
    assert_conforms(SPEC, "/schedule_message", "post", resp)
