"""openapi.yaml stays true to the code: it is a valid OpenAPI document, it describes exactly the HTTP
entry points of functions/main.py, its request schema is the one ScheduleRequest.parse enforces, and
the answers the real functions give (through functions-framework's app, on real Postgres, with the
real twilio client against the local sink) validate against the schema it declares for their status.

Paths in the spec are prefixed with the function's name (its path on the cloudfunctions.net URL);
each function's own app serves them without that prefix (`function_view` does the mapping)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient
from functions_framework import create_app
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate as validate_spec
from werkzeug.test import TestResponse

from shared import bootstrap, domain, errors, policy
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.domain import STATUSES
from shared.identity import IDENTITY_HEADER
from shared.models import SweepReport
from shared.parsing import MAX_AGENT_ID, MAX_IDEMPOTENCY_KEY, MAX_PARTS, SCHEDULE_FIELDS
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.integration.sms_fixtures import TEST_AUTH_TOKEN
from tests.support.constants import MAIN, T0
from tests.support.factories import make_user, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "openapi.yaml"
DEAD_DATABASE = "postgresql://postgres@127.0.0.1:1/none"
SETTINGS = Settings(twilio_auth_token=TEST_AUTH_TOKEN)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


# ---------------------------------------------------------------------------------------------------
# Helpers (test_schemathesis.py uses them too)


@cache
def _load_spec() -> str:
    return SPEC_PATH.read_text()


def load_spec() -> dict[str, Any]:
    """A fresh copy of openapi.yaml."""
    return yaml.safe_load(_load_spec())


def http_entry_points() -> list[str]:
    """The functions in functions/main.py decorated with @functions_framework.http, by parsing it."""
    tree = ast.parse(Path(MAIN).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if ast.unparse(target) in ("functions_framework.http", "http"):
                    names.append(node.name)
    return names


def function_of(spec_path: str) -> str:
    """The function a spec path belongs to: its first segment."""
    return spec_path.strip("/").split("/", 1)[0]


def local_path(spec_path: str) -> str:
    """The path the function itself serves: the spec path without the function's name."""
    rest = spec_path.strip("/").split("/", 1)
    return "/" + (rest[1] if len(rest) > 1 else "")


def function_view(spec: dict[str, Any], function: str) -> dict[str, Any]:
    """The spec as one function's own base URL sees it: its paths only, without the name prefix."""
    view = copy.deepcopy(spec)
    view["paths"] = {
        local_path(path): item for path, item in spec["paths"].items() if function_of(path) == function
    }
    view["servers"] = [{"url": "/"}]
    return view


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """`node` with every local $ref inlined (the spec has no recursive schemas)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolve(spec, target)
        return {k: resolve(spec, v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(spec, v) for v in node]
    return node


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def declared_response(spec: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, (
        f"{method.upper()} {path} answered {status}, not declared in openapi.yaml"
    )
    return resolve(spec, responses[str(status)])


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = OAS30Validator(schema, format_checker=oas30_format_checker)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def assert_conforms(spec: dict[str, Any], path: str, method: str, resp: TestResponse) -> Any:
    """The answer validates against the schema (and headers) openapi.yaml declares for its status."""
    declared = declared_response(spec, path, method, resp.status_code)
    for name, header in declared.get("headers", {}).items():
        if header.get("required"):
            assert name in resp.headers, f"{resp.status_code} lacks the declared {name} header"
        if name in resp.headers:
            problems = schema_errors(header["schema"], resp.headers[name])
            assert not problems, f"header {name}: {problems}"
    [(media_type, content)] = declared["content"].items()
    assert resp.mimetype == media_type
    text = resp.get_data(as_text=True)
    body = json.loads(text) if media_type == "application/json" else text
    problems = schema_errors(content["schema"], body)
    assert not problems, f"{method.upper()} {path} {resp.status_code} {body!r}:\n" + "\n".join(problems)
    return body


# ---------------------------------------------------------------------------------------------------
# The document itself


def test_the_spec_is_a_valid_openapi_document() -> None:
    validate_spec(load_spec())


def test_every_http_entry_point_has_paths_and_every_path_is_an_entry_point() -> None:
    spec = load_spec()
    entry_points = http_entry_points()
    assert entry_points, "no @functions_framework.http function found in functions/main.py"
    assert {function_of(p) for p in spec["paths"]} == set(entry_points)
    assert {t["name"] for t in spec["tags"]} == set(entry_points)
    for path, _, op in operations(spec):
        assert op["tags"] == [function_of(path)], path


def test_the_entry_points_found_by_parsing_are_the_ones_functions_framework_serves() -> None:
    from functions_framework import _function_registry

    import functions.main as main  # importing it registers the functions' signature types

    http = {
        name
        for name in vars(main)
        if _function_registry.REGISTRY_MAP.get(name) == _function_registry.HTTP_SIGNATURE_TYPE
    }
    assert http == set(http_entry_points())
    assert "sweep_queue" not in http  # a CloudEvent function: deliberately not in the spec


def test_the_request_schema_is_what_schedule_request_parse_enforces() -> None:
    spec = load_spec()
    request = resolve(spec, spec["components"]["schemas"]["ScheduleRequest"])
    assert set(request["properties"]) == SCHEDULE_FIELDS
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"userId", "agentId"}
    assert [set(alt["required"]) for alt in request["oneOf"]] == [{"messageData"}, {"sequence"}]
    assert request["properties"]["sequence"]["maxItems"] == MAX_PARTS
    props = request["properties"]
    assert props["priority"]["allOf"][0]["enum"] == list(domain.PRIORITIES)
    assert props["priority"]["default"] == "medium"
    assert props["agentId"]["maxLength"] == MAX_AGENT_ID
    assert props["idempotencyKey"]["maxLength"] == MAX_IDEMPOTENCY_KEY
    assert props["messageData"]["properties"]["content"]["maxLength"] == Settings().max_content_length
    header = resolve(spec, spec["components"]["parameters"]["IdempotencyKey"])
    assert header["name"] == "Idempotency-Key" and header["schema"]["maxLength"] == MAX_IDEMPOTENCY_KEY
    for name in ("userId", "conversationId"):
        assert props[name]["format"] == "uuid"


def test_the_response_enums_are_the_codes_the_code_uses() -> None:
    spec = load_spec()
    schemas = spec["components"]["schemas"]
    assert schemas["MessageState"]["enum"] == list(STATUSES)
    assert schemas["Priority"]["enum"] == list(domain.PRIORITIES)
    assert set(schemas["PolicyRule"]["enum"]) == set(policy.SEVERITY)
    created_reason = schemas["ScheduleCreated"]["allOf"][1]["properties"]["reason"]["enum"]
    assert set(created_reason) == {policy.OK, *policy.SEVERITY}
    assert schemas["DeliverOutcome"]["properties"]["status"]["enum"] == [*STATUSES, "unknown"]
    assert schemas["SweepCounts"]["required"] == [f.name for f in dataclasses.fields(SweepReport)]
    assert set(schemas["SweepCounts"]["properties"]) == {f.name for f in dataclasses.fields(SweepReport)}

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {errors.OrchestratorError.code} | {c.code for c in subclasses(errors.OrchestratorError)}
    assert bootstrap.ConfigurationError.code in codes
    assert set(schemas["ErrorBody"]["properties"]["error"]["enum"]) == codes | {"method_not_allowed"}


def test_every_response_object_schema_says_whether_it_allows_undeclared_properties() -> None:
    """additionalProperties: false everywhere an answer is built by the code, so a property added to
    a body without the spec fails the conformance tests below."""
    spec = load_spec()

    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            strict = node.get("additionalProperties") is False
            if node.get("type") == "object" and "properties" in node and not strict:
                yield where
            for k, v in node.items():
                yield from walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{where}/{i}")

    loose = [
        w
        for path, method, op in operations(spec)
        for status, r in op["responses"].items()
        for w in walk(resolve(spec, r), f"{method.upper()} {path} {status}")
        # allOf members only narrow what their first member (additionalProperties: false) declares
        if not re.search(r"/allOf/[1-9]", w)
    ]
    assert loose == []


# ---------------------------------------------------------------------------------------------------
# The real answers conform


@dataclass
class Env:
    store: PostgresStore
    tasks: RecordingTaskQueue
    sink: SmsSink
    sender: TwilioSender
    container: bootstrap.Container
    database_url: str

    @property
    def clock(self) -> VirtualClock:
        clock = self.container.clock
        assert isinstance(clock, VirtualClock)
        return clock

    def client(self, function: str) -> FlaskClient:
        return create_app(function, MAIN).test_client()

    def schedule(self, user: uuid.UUID | None = None, **fields: Any) -> TestResponse:
        body = {
            "userId": str(user or make_user(self.store)),
            "agentId": "concierge_agent",
            "messageData": {"content": "Your intro request has been matched!"},
            "priority": "high",
        } | fields
        body = {k: v for k, v in body.items() if v is not None or k != "messageData"}
        return self.client("schedule_message").post("/", json=body)

    def scheduled(self, user: uuid.UUID | None = None, **fields: Any) -> str:
        resp = self.schedule(user, **fields)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return str(resp.get_json()["messageId"])

    def deliver(self, message_id: str, generation: int | None = 0) -> TestResponse:
        return self.client("deliver_message").post(
            "/",
            json={"messageId": message_id, "generation": generation},
            headers={"X-CloudTasks-TaskRetryCount": "0"},
        )

    def twilio(self, function: str, form: dict[str, str], *, signed: bool = True) -> TestResponse:
        """A webhook as Twilio sends it: a form, signed with the auth token for the URL it posts to."""
        from twilio.request_validator import RequestValidator

        signature = RequestValidator(TEST_AUTH_TOKEN).compute_signature("http://localhost/", form)
        headers = {"X-Twilio-Signature": signature} if signed else {}
        return self.client(function).post("/", data=form, headers=headers)

    @contextmanager
    def settings(self, settings: Settings) -> Iterator[None]:
        """The functions run with other settings (the same adapters) inside the block."""
        c = bootstrap.Container(
            settings, store=self.store, tasks=self.tasks, sms=self.sender, clock=self.clock
        )
        previous = bootstrap.install(c)
        try:
            yield
        finally:
            bootstrap.install(previous)

    @contextmanager
    def dead_database(self) -> Iterator[None]:
        dead = PostgresStore(DEAD_DATABASE, timeout=0.5)
        c = bootstrap.Container(
            SETTINGS, store=dead, tasks=self.tasks, sms=self.sender, clock=VirtualClock(T0)
        )
        previous = bootstrap.install(c)
        try:
            yield
        finally:
            bootstrap.install(previous)
            dead.close()


@pytest.fixture
def container_settings() -> Settings:
    return SETTINGS


@pytest.fixture
def env(
    container: bootstrap.Container,
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    database_url: str,
    sms_sink: SmsSink,
    twilio_sender: TwilioSender,
) -> Env:
    return Env(store, tasks, sms_sink, twilio_sender, container, database_url)


SCHEDULE = "/schedule_message"
STATUS = "/schedule_message/messages/{messageId}"
DELIVER = "/deliver_message"
PROCESS = "/process_queue"
HEALTH = "/health"
INBOUND = "/twilio_inbound"
TWILIO_STATUS = "/twilio_status"
CANCEL = "/schedule_message/messages/{messageId}/cancel"
CONSENT = "/schedule_message/users/{userId}/consent"
USER_MESSAGES = "/schedule_message/users/{userId}/messages"


def _replay(env: Env) -> TestResponse:
    user = make_user(env.store)
    env.scheduled(user, idempotencyKey="turn-1")
    return env.schedule(user, idempotencyKey="turn-1")


def _replay_blocked(env: Env) -> TestResponse:
    """A replay of a message the cooldown deferred: its blockedBy is the first plan's."""
    user = make_user(env.store)
    env.scheduled(user)
    env.scheduled(user, idempotencyKey="turn-2")
    resp = env.schedule(user, idempotencyKey="turn-2")
    assert resp.get_json()["blockedBy"] == ["cooldown"], resp.get_data(as_text=True)
    return resp


def _key_reused(env: Env) -> TestResponse:
    user = make_user(env.store)
    env.scheduled(user, idempotencyKey="turn-1")
    return env.schedule(user, idempotencyKey="turn-1", messageData={"content": "something else"})


def _opted_out(env: Env) -> TestResponse:
    user = make_user(env.store)
    sql(env.database_url, "update users set opted_out_at = %s where id = %s", T0, user)
    return env.schedule(user)


def _undeliverable(env: Env) -> TestResponse:
    user = make_user(env.store)
    sql(env.database_url, "update users set undeliverable_at = %s where id = %s", T0, user)
    return env.schedule(user)


def _not_deliverable(env: Env) -> TestResponse:
    env.clock.now = datetime(2025, 6, 3, 3, 0, tzinfo=UTC)  # 23:00 in New York: quiet until 08:00
    user = make_user(env.store, "America/New_York")
    return env.schedule(user, priority="medium", expiresAt="2025-06-03T04:00:00Z")


# Agents bound to identities (CALLER_IDENTITY=header stands in for the verified ID token).
IDENTIFIED = replace(
    SETTINGS, caller_identity="header", agent_identities={"coach@agents.test": frozenset({"coach_agent"})}
)
AS_COACH = {IDENTITY_HEADER: "coach@agents.test"}


def _as_coach(method: str, path: str, **kwargs: Any) -> Callable[[Env], TestResponse]:
    """A request by the coach agent's identity; `{id}` in `path` is a concierge message."""

    def run(env: Env) -> TestResponse:
        message_id = env.scheduled()
        with env.settings(IDENTIFIED):
            client = env.client("schedule_message")
            return client.open(path.format(id=message_id), method=method, headers=AS_COACH, **kwargs)

    return run


def _anonymous(method: str, path: str, **kwargs: Any) -> Callable[[Env], TestResponse]:
    def run(env: Env) -> TestResponse:
        message_id = env.scheduled()
        with env.settings(IDENTIFIED):
            return env.client("schedule_message").open(path.format(id=message_id), method=method, **kwargs)

    return run


def _queue_full(env: Env) -> TestResponse:
    user = make_user(env.store)
    with env.settings(replace(SETTINGS, user_queue_limit=1)):
        env.scheduled(user)
        return env.schedule(user)


def _rate_limited(env: Env) -> TestResponse:
    with env.settings(replace(SETTINGS, agent_rate_per_minute=1)):
        env.scheduled()
        return env.schedule()


def _post_raw(data: bytes, content_type: str) -> Callable[[Env], TestResponse]:
    return lambda env: env.client("schedule_message").post("/", data=data, content_type=content_type)


def _dead(call: Callable[[Env], TestResponse]) -> Callable[[Env], TestResponse]:
    def run(env: Env) -> TestResponse:
        with env.dead_database():
            return call(env)

    return run


def _get(message_id: Callable[[Env], str]) -> Callable[[Env], TestResponse]:
    return lambda env: env.client("schedule_message").get(f"/messages/{message_id(env)}")


def _cancel(message_id: Callable[[Env], str], **kwargs: Any) -> Callable[[Env], TestResponse]:
    return lambda env: env.client("schedule_message").post(f"/messages/{message_id(env)}/cancel", **kwargs)


PARTS = [{"content": "Great news!"}, {"content": "Sam accepted.", "delaySeconds": 2}]


def _sequence(env: Env) -> str:
    resp = env.schedule(messageData=None, sequence=PARTS, topicKey="intro")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json()["messageId"])


def _sent(env: Env) -> str:
    message_id = env.scheduled()
    assert env.deliver(message_id).get_json()["action"] == "sent"
    return message_id


def _deliver_early(env: Env) -> TestResponse:
    user = make_user(env.store)
    env.scheduled(user)
    second = env.scheduled(user)  # planned after the cooldown; its task woke now
    return env.deliver(second)


def _deliver_permanent_failure(env: Env) -> TestResponse:
    message_id = env.scheduled()
    env.sink.add_fault(status=400, code=21211)
    return env.deliver(message_id)


def _deliver_transient_failure(env: Env) -> TestResponse:
    message_id = env.scheduled()
    env.sink.add_fault(status=500)
    return env.deliver(message_id)


def _sweep(env: Env) -> TestResponse:
    return env.client("process_queue").post("/")


def _healthy(env: Env) -> TestResponse:
    env.scheduled()
    assert _sweep(env).status_code == 200
    return env.client("health").get("/")


def _stale(env: Env) -> TestResponse:
    assert _sweep(env).status_code == 200
    env.clock.advance(timedelta(seconds=Settings().health_stale_seconds + 1))
    return env.client("health").get("/")


def _inbound(**form: str) -> Callable[[Env], TestResponse]:
    base = {"From": "+15557654321", "To": "+15005550006", "Body": "STOP", "MessageSid": "SM" + "a" * 32}
    return lambda env: env.twilio("twilio_inbound", base | form)


REPLIES = replace(
    SETTINGS, stop_reply="Acme: you're unsubscribed & won't hear from us. Reply START to resume."
)


def _inbound_reply(env: Env) -> TestResponse:
    with env.settings(REPLIES):
        return _inbound(Body="stop texting me, please")(env)


def _user_messages(
    query: str = "", user: Callable[[Env], str] | None = None
) -> Callable[[Env], TestResponse]:
    """A listing of a user with a queued, a cancelled and a sent message (or of `user`)."""

    def run(env: Env) -> TestResponse:
        if user is not None:
            return env.client("schedule_message").get(f"/users/{user(env)}/messages{query}")
        owner = make_user(env.store)
        assert env.deliver(env.scheduled(owner)).get_json()["action"] == "sent"
        env.scheduled(owner, topicKey="t")
        cancelled = env.scheduled(owner)
        assert env.client("schedule_message").post(f"/messages/{cancelled}/cancel").status_code == 200
        return env.client("schedule_message").get(f"/users/{owner}/messages{query}")

    return run


def _consent(user: Callable[[Env], uuid.UUID | str], query: str = "") -> Callable[[Env], TestResponse]:
    return lambda env: env.client("schedule_message").get(f"/users/{user(env)}/consent{query}")


def _opted_out_by_stop(env: Env) -> uuid.UUID:
    assert _inbound()(env).status_code == 200
    [(user,)] = sql(env.database_url, "select id from users where phone_number = '+15557654321'")
    return uuid.UUID(str(user))


def _deliver_unsubscribed(env: Env) -> TestResponse:
    message_id = env.scheduled(make_user(env.store, phone="+15005550004"))  # the sink's 21610 number
    return env.deliver(message_id)


def _receipt(env: Env) -> TestResponse:
    message_id = _sent(env)
    sid = env.client("schedule_message").get(f"/messages/{message_id}").get_json()["twilioMessageSid"]
    return env.twilio("twilio_status", {"MessageSid": sid, "MessageStatus": "delivered"})


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    method: str
    status: int
    run: Callable[[Env], TestResponse]


def _post(function: str, **kwargs: Any) -> Callable[[Env], TestResponse]:
    return lambda env: env.client(function).post("/", **kwargs)


def _schedule(**fields: Any) -> Callable[[Env], TestResponse]:
    return lambda env: env.schedule(**fields)


def _schedule_for(user: Callable[[Env], uuid.UUID]) -> Callable[[Env], TestResponse]:
    return lambda env: env.schedule(user(env))


def _deferred(env: Env) -> TestResponse:
    user = make_user(env.store)
    env.scheduled(user)
    return env.schedule(user)  # after the cooldown


def _health(env: Env) -> TestResponse:
    return env.client("health").get("/")


def _deliver(message_id: Callable[[Env], str], generation: int | None = 0) -> Callable[[Env], TestResponse]:
    return lambda env: env.deliver(message_id(env), generation)


def _status_callback(**form: str) -> Callable[[Env], TestResponse]:
    return lambda env: env.twilio("twilio_status", form)


def _new_id(env: Env) -> str:
    return str(uuid.uuid4())


def _new_user(timezone: str) -> Callable[[Env], uuid.UUID]:
    return lambda env: make_user(env.store, timezone)


BAD_FIELDS = {"userId": "x", "agentId": 5, "messageData": {"content": ""}, "priority": "now", "snake_case": 1}
SIGNED_GARBAGE = {"X-Twilio-Signature": "bm90IGl0"}

SCENARIOS = [
    Scenario("schedule-created", SCHEDULE, "post", 201, _schedule()),
    Scenario("schedule-deferred", SCHEDULE, "post", 201, _deferred),
    Scenario("schedule-replay", SCHEDULE, "post", 200, _replay),
    Scenario("schedule-replay-blocked", SCHEDULE, "post", 200, _replay_blocked),
    Scenario("schedule-bad-fields", SCHEDULE, "post", 400, _post("schedule_message", json=BAD_FIELDS)),
    Scenario("schedule-not-an-object", SCHEDULE, "post", 400, _post("schedule_message", json=["userId"])),
    Scenario("schedule-malformed-json", SCHEDULE, "post", 400, _post_raw(b'{"userId": ', "application/json")),
    Scenario("schedule-not-json", SCHEDULE, "post", 400, _post_raw(b"userId=1", "text/plain")),
    Scenario("schedule-too-large", SCHEDULE, "post", 413, _post_raw(b" " * 65537, "application/json")),
    Scenario(
        "schedule-unknown-conversation", SCHEDULE, "post", 400, _schedule(conversationId=str(uuid.uuid4()))
    ),
    Scenario("schedule-bad-timezone", SCHEDULE, "post", 400, _schedule_for(_new_user("Mars/Olympus_Mons"))),
    Scenario("schedule-unknown-user", SCHEDULE, "post", 404, _schedule_for(lambda env: uuid.uuid4())),
    Scenario("schedule-opted-out", SCHEDULE, "post", 409, _opted_out),
    Scenario("schedule-undeliverable", SCHEDULE, "post", 409, _undeliverable),
    Scenario("schedule-key-reused", SCHEDULE, "post", 409, _key_reused),
    Scenario("schedule-not-deliverable", SCHEDULE, "post", 422, _not_deliverable),
    Scenario("schedule-anonymous", SCHEDULE, "post", 401, _anonymous("POST", "/", json={})),
    Scenario(
        "schedule-forbidden-agent",
        SCHEDULE,
        "post",
        403,
        _as_coach(
            "POST",
            "/",
            json={
                "userId": str(uuid.uuid4()),
                "agentId": "concierge_agent",
                "messageData": {"content": "hi"},
            },
        ),
    ),
    Scenario("schedule-user-queue-full", SCHEDULE, "post", 429, _queue_full),
    Scenario("schedule-agent-rate-limited", SCHEDULE, "post", 429, _rate_limited),
    Scenario("status-anonymous", STATUS, "get", 401, _anonymous("GET", "/messages/{id}")),
    Scenario("status-forbidden-agent", STATUS, "get", 403, _as_coach("GET", "/messages/{id}")),
    Scenario("cancel-anonymous", CANCEL, "post", 401, _anonymous("POST", "/messages/{id}/cancel")),
    Scenario("cancel-forbidden-agent", CANCEL, "post", 403, _as_coach("POST", "/messages/{id}/cancel")),
    Scenario("schedule-database-down", SCHEDULE, "post", 503, _dead(_schedule_for(lambda env: uuid.uuid4()))),
    Scenario(
        "status-queued",
        STATUS,
        "get",
        200,
        _get(lambda env: env.scheduled(expiresAt="2025-06-09T00:00:00+02:00")),
    ),
    Scenario("status-sent", STATUS, "get", 200, _get(_sent)),
    Scenario("status-sequence", STATUS, "get", 200, _get(_sequence)),
    Scenario(
        "schedule-sequence", SCHEDULE, "post", 201, _schedule(messageData=None, sequence=PARTS, topicKey="t")
    ),
    Scenario(
        "cancel-queued", CANCEL, "post", 200, _cancel(lambda env: env.scheduled(), json={"reason": "done"})
    ),
    Scenario("cancel-too-large", CANCEL, "post", 413, _cancel(_new_id, json={"reason": "x" * 65536})),
    Scenario("cancel-bad-body", CANCEL, "post", 400, _cancel(lambda env: env.scheduled(), json={"x": 1})),
    Scenario(
        "cancel-not-owner",
        CANCEL,
        "post",
        403,
        _cancel(lambda env: env.scheduled(), json={"agentId": "other"}),
    ),
    Scenario("cancel-unknown", CANCEL, "post", 404, _cancel(_new_id)),
    Scenario("cancel-sent", CANCEL, "post", 409, _cancel(_sent)),
    Scenario("cancel-database-down", CANCEL, "post", 503, _dead(_cancel(_new_id))),
    Scenario("status-unknown", STATUS, "get", 404, _get(_new_id)),
    Scenario("status-not-a-uuid", STATUS, "get", 400, _get(lambda env: "not-a-uuid")),
    Scenario("status-database-down", STATUS, "get", 503, _dead(_get(_new_id))),
    Scenario("deliver-sent", DELIVER, "post", 200, _deliver(lambda env: env.scheduled())),
    Scenario("deliver-duplicate", DELIVER, "post", 200, _deliver(_sent)),
    Scenario("deliver-early", DELIVER, "post", 200, _deliver_early),
    Scenario("deliver-stale-task", DELIVER, "post", 200, _deliver(lambda env: env.scheduled(), generation=7)),
    Scenario("deliver-unknown", DELIVER, "post", 200, _deliver(_new_id, generation=None)),
    Scenario("deliver-twilio-refused", DELIVER, "post", 200, _deliver_permanent_failure),
    Scenario(
        "deliver-bad-body",
        DELIVER,
        "post",
        400,
        _post("deliver_message", json={"messageId": "x", "generation": -1}),
    ),
    Scenario(
        "deliver-too-large",
        DELIVER,
        "post",
        413,
        _post("deliver_message", data=b"{" * 65537, content_type="application/json"),
    ),
    Scenario("deliver-twilio-down", DELIVER, "post", 503, _deliver_transient_failure),
    Scenario("deliver-database-down", DELIVER, "post", 503, _dead(_deliver(_new_id))),
    Scenario("process-queue", PROCESS, "post", 200, _sweep),
    Scenario("process-queue-database-down", PROCESS, "post", 503, _dead(_sweep)),
    Scenario("health-healthy", HEALTH, "get", 200, _healthy),
    Scenario("health-no-sweep-yet", HEALTH, "get", 503, _health),
    Scenario("health-sweep-stale", HEALTH, "get", 503, _stale),
    Scenario("health-database-down", HEALTH, "get", 503, _dead(_health)),
    Scenario("inbound-stop", INBOUND, "post", 200, _inbound()),
    Scenario("inbound-stop-reply", INBOUND, "post", 200, _inbound_reply),
    Scenario("user-messages", USER_MESSAGES, "get", 200, _user_messages()),
    Scenario(
        "user-messages-page", USER_MESSAGES, "get", 200, _user_messages("?limit=1&status=queued&topic=t")
    ),
    Scenario("user-messages-bad-status", USER_MESSAGES, "get", 400, _user_messages("?status=lost")),
    Scenario("user-messages-anonymous", USER_MESSAGES, "get", 401, _anonymous("GET", "/users/{id}/messages")),
    Scenario(
        "user-messages-unknown-user",
        USER_MESSAGES,
        "get",
        404,
        _user_messages(user=lambda env: str(uuid.uuid4())),
    ),
    Scenario(
        "user-messages-database-down",
        USER_MESSAGES,
        "get",
        503,
        _dead(_user_messages(user=lambda env: str(uuid.uuid4()))),
    ),
    Scenario("consent-history", CONSENT, "get", 200, _consent(_opted_out_by_stop)),
    Scenario("consent-history-limited", CONSENT, "get", 200, _consent(_opted_out_by_stop, "?limit=1")),
    Scenario("consent-not-a-uuid", CONSENT, "get", 400, _consent(lambda env: "nope")),
    Scenario("consent-bad-limit", CONSENT, "get", 400, _consent(_new_user("UTC"), "?limit=0")),
    Scenario("consent-anonymous", CONSENT, "get", 401, _anonymous("GET", "/users/{id}/consent")),
    Scenario("consent-forbidden-agent", CONSENT, "get", 403, _as_coach("GET", "/users/{id}/consent")),
    Scenario("consent-unknown-user", CONSENT, "get", 404, _consent(lambda env: uuid.uuid4())),
    Scenario("consent-database-down", CONSENT, "get", 503, _dead(_consent(lambda env: uuid.uuid4()))),
    Scenario("deliver-unsubscribed", DELIVER, "post", 200, _deliver_unsubscribed),
    Scenario("inbound-without-sender", INBOUND, "post", 400, _inbound(From="me")),
    Scenario(
        "inbound-unsigned", INBOUND, "post", 403, _post("twilio_inbound", data={"From": "+15557654321"})
    ),
    Scenario("inbound-database-down", INBOUND, "post", 503, _dead(_inbound(Body="hi"))),
    Scenario("status-callback", TWILIO_STATUS, "post", 200, _receipt),
    Scenario(
        "status-callback-unknown-sid",
        TWILIO_STATUS,
        "post",
        200,
        _status_callback(MessageSid="SMb", MessageStatus="sent"),
    ),
    Scenario(
        "status-callback-bad-status",
        TWILIO_STATUS,
        "post",
        400,
        _status_callback(MessageSid="SMx", MessageStatus="lost"),
    ),
    Scenario(
        "status-callback-bad-signature",
        TWILIO_STATUS,
        "post",
        403,
        _post("twilio_status", data={"MessageSid": "SMx"}, headers=SIGNED_GARBAGE),
    ),
    Scenario(
        "status-callback-database-down",
        TWILIO_STATUS,
        "post",
        503,
        _dead(_status_callback(MessageSid="SMx", MessageStatus="sent")),
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_real_answers_validate_against_the_declared_response(env: Env, scenario: Scenario) -> None:
    resp = scenario.run(env)
    assert resp.status_code == scenario.status, resp.get_data(as_text=True)
    body = assert_conforms(load_spec(), scenario.path, scenario.method, resp)
    assert "Traceback" not in resp.get_data(as_text=True)
    if resp.status_code >= 400 and "error" in body:
        assert body["success"] is False and body["message"]


def test_the_scenarios_cover_every_declared_answer() -> None:
    """Each (operation, status) openapi.yaml declares is produced by a scenario above, except the
    500s, which only a bug or a misconfiguration produces."""
    spec = load_spec()
    declared = {
        (path, method, int(status)) for path, method, op in operations(spec) for status in op["responses"]
    }
    covered = {(s.path, s.method, s.status) for s in SCENARIOS}
    assert covered <= declared
    assert declared - covered == {(path, method, 500) for path, method, _ in operations(spec)}


def test_methods_the_spec_does_not_declare_answer_405_with_an_error_body(env: Env) -> None:
    spec = load_spec()
    error_body = resolve(spec, spec["components"]["schemas"]["ErrorBody"])
    for function in http_entry_points():
        declared = {m.upper() for p, m, _ in operations(spec) if function_of(p) == function}
        client = env.client(function)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            resp = client.open("/", method=method)
            if method in declared:
                assert resp.status_code != 405, (function, method)
                continue
            assert resp.status_code == 405, (function, method, resp.status_code)
            body = resp.get_json()
            assert schema_errors(error_body, body) == [] and body["error"] == "method_not_allowed"
            assert set(resp.headers["Allow"].split(", ")) == declared, (function, method)


def test_the_function_views_serve_the_spec_paths_without_the_prefix(env: Env) -> None:
    view = function_view(load_spec(), "schedule_message")
    assert set(view["paths"]) == {
        "/",
        "/messages/{messageId}",
        "/messages/{messageId}/cancel",
        "/users/{userId}/consent",
        "/users/{userId}/messages",
    }
    message_id = env.scheduled()
    resp = env.client("schedule_message").get("/messages/{messageId}".replace("{messageId}", message_id))
    assert resp.status_code == 200 and resp.get_json()["messageId"] == message_id
    cancel = env.client("schedule_message").post(f"/messages/{message_id}/cancel")
    assert cancel.status_code == 200 and cancel.get_json()["status"] == "cancelled"
