"""Rendering and relevance in the real use cases: the real `anthropic` client against a local fake
Anthropic server, real Postgres, the real twilio client and the SMS sink; time virtual."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from functions_framework import create_app

from shared import bootstrap, service
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.domain import Limits
from shared.models import Outcome
from shared.render import ClaudeRenderer, TemplateRenderer
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.factories import budget, make_active, make_user, row, sql
from tests.support.fake_anthropic import FakeAnthropic, delay, status, text, tool_use
from tests.support.fakes import RecordingTaskQueue, VirtualClock

POLICY = service.Policy(limits=Limits(), max_attempts=3, render_max_length=160)
STRUCTURED = {"type": "intro_match", "style": "snarky", "name": "Sam", "venue": "The Blue Door"}


@pytest.fixture
def claude(fake: FakeAnthropic) -> ClaudeRenderer:
    return ClaudeRenderer(
        api_key="test-key", base_url=fake.url, model="claude-haiku-4-5", timeout_seconds=0.5
    )


def schedule(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    renderer: Any,
    user: uuid.UUID,
    now: datetime,
    message_data: dict[str, Any],
    **fields: Any,
) -> service.ScheduleResult:
    body = {"userId": str(user), "agentId": "concierge_agent", "messageData": message_data, **fields}
    return service.schedule(body, store=store, tasks=tasks, config=POLICY, now=now, renderer=renderer)


def deliver(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    sender: TwilioSender,
    renderer: Any,
    clock: VirtualClock,
    message_id: uuid.UUID,
) -> Outcome:
    m = store.get_message(message_id)
    assert m is not None
    return service.deliver(
        {"messageId": str(message_id), "generation": m.generation},
        store=store,
        tasks=tasks,
        sms=sender,
        config=POLICY,
        clock=clock,
        renderer=renderer,
    )


def actions(database_url: str, message_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return sql(
        database_url,
        "select action_type, input_data, output_data, error, latency_ms from agent_actions_log"
        " where message_id = %s order by created_at, action_type",
        message_id,
    )


def test_a_structured_message_is_rendered_when_scheduled_within_the_length_and_sent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York")
    make_active(store, user, T0 - timedelta(hours=2))  # some conversation for the model to see
    long_answer = "Sam said yes to meeting you at The Blue Door, " + "which is great news " * 20
    fake.script(text(long_answer, usage={"input_tokens": 1200, "output_tokens": 90}))

    result = schedule(store, tasks, claude, user, T0, STRUCTURED)

    assert result.created
    stored = row(database_url, result.message.id)
    final = stored["final_message"]
    assert final and len(final) <= POLICY.render_max_length and final.startswith("Sam said yes")
    assert not final.lstrip().startswith("{")
    [request] = fake.requests
    assert request.body["model"] == "claude-haiku-4-5"
    assert request.body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert "The Blue Door" in json.dumps(request.body["messages"])
    [(_action, usage, output, error, latency)] = [
        a for a in actions(database_url, result.message.id) if a[0] == "rendered"
    ]
    assert (
        usage["model"] == "claude-haiku-4-5" and usage["inputTokens"] == 1200 and usage["outputTokens"] == 90
    )
    assert usage["costUsd"] == pytest.approx((1200 * 1 + 90 * 5) / 1_000_000)
    assert latency is not None and latency >= 0 and output["length"] == len(final) and error is None

    outcome = deliver(store, tasks, twilio_sender, claude, clock, result.message.id)
    assert outcome.action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == [final]
    assert len(fake.requests) == 1  # rendered once, when scheduled


@pytest.mark.parametrize("failure", ["server_error", "timeout"])
def test_a_failed_render_keeps_the_row_queued_and_is_retried(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
    failure: str,
) -> None:
    user = make_user(store)
    # Fresh context: rendered at delivery, from the conversation as it is then.
    result = schedule(store, tasks, claude, user, T0, STRUCTURED, requiresFreshContext=True)
    assert fake.requests == []
    fake.script(status(500) if failure == "server_error" else delay(2.0), text("Sam is in. Tonight, 8pm?"))

    first = deliver(store, tasks, twilio_sender, claude, clock, result.message.id)

    assert (first.action, first.reason) == ("deferred", "render_unavailable")
    r = row(database_url, result.message.id)
    assert r["status"] == "queued" and r["final_message"] is None and r["render_attempts"] == 1
    assert r["slot_at"] is None and sms_sink.messages() == []
    assert first.scheduled_for == T0 + timedelta(seconds=30)
    logged = [a for a in actions(database_url, result.message.id) if a[0] == "render_failed"]
    assert len(logged) == 1 and logged[0][3] and logged[0][1]["operation"] == "render"

    clock.now = first.scheduled_for
    second = deliver(store, tasks, twilio_sender, claude, clock, result.message.id)
    assert second.action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["Sam is in. Tonight, 8pm?"]
    assert budget(database_url, user) == {"2025-06-02": 1}


def test_renders_that_keep_failing_fail_the_message_and_never_send_raw_data(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(store, tasks, claude, user, T0, STRUCTURED, requiresFreshContext=True)
    fake.script(*[text(json.dumps(STRUCTURED))] * POLICY.max_attempts)  # the model echoes JSON back
    outcome: Outcome | None = None
    for _ in range(POLICY.max_attempts):
        outcome = deliver(store, tasks, twilio_sender, claude, clock, result.message.id)
        if outcome.scheduled_for:
            clock.now = outcome.scheduled_for
    assert outcome is not None and (outcome.action, outcome.reason) == ("failed", "render_failed")
    assert row(database_url, result.message.id)["status"] == "failed"
    assert sms_sink.messages() == []


def test_a_stale_message_is_superseded_without_sending_or_budget(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(
        store,
        tasks,
        claude,
        user,
        T0,
        {"content": "Still looking for a dinner spot tonight?"},
        requiresFreshContext=True,
    )
    store.record_inbound(
        user, "Booked one already, thanks!", "SM" + uuid.uuid4().hex, T0 + timedelta(minutes=1)
    )
    fake.script(
        tool_use("record_relevance", {"relevant": False, "reason": "the user already booked a place"})
    )
    clock.advance(timedelta(minutes=2))

    outcome = deliver(store, tasks, twilio_sender, claude, clock, result.message.id)

    assert (outcome.action, outcome.status) == ("superseded", "superseded")
    r = row(database_url, result.message.id)
    assert r["status"] == "superseded" and r["superseded_reason"] == "the user already booked a place"
    assert r["slot_at"] is None and sms_sink.messages() == [] and budget(database_url, user) == {}
    [request] = fake.requests
    assert request.body["tool_choice"] == {"type": "tool", "name": "record_relevance"}
    assert "Booked one already" in json.dumps(request.body["messages"])
    logged = [a for a in actions(database_url, result.message.id) if a[0] == "superseded"]
    assert logged and logged[0][1]["model"] == "claude-haiku-4-5"
    events = sql(database_url, "select payload from events_outbox where event_type = 'message.superseded'")
    assert [e[0]["reason"] for e in events] == ["stale"]


def test_a_relevant_message_after_a_reply_is_sent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(
        store, tasks, claude, user, T0, {"content": "Your table is at 8"}, requiresFreshContext=True
    )
    store.record_inbound(user, "what time again?", "SM" + uuid.uuid4().hex, T0 + timedelta(minutes=1))
    fake.script(tool_use("record_relevance", {"relevant": True, "reason": "answers the question"}))
    clock.advance(timedelta(minutes=2))
    assert deliver(store, tasks, twilio_sender, claude, clock, result.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["Your table is at 8"]
    assert [a[0] for a in actions(database_url, result.message.id)].count("relevance_checked") == 1


def test_no_inbound_since_queueing_means_no_model_call_at_all(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
) -> None:
    user = make_user(store)
    make_active(store, user, T0 - timedelta(hours=1))  # a reply before it was queued does not count
    result = schedule(
        store, tasks, claude, user, T0, {"content": "Reminder: call at 3"}, requiresFreshContext=True
    )
    clock.advance(timedelta(minutes=5))
    assert deliver(store, tasks, twilio_sender, claude, clock, result.message.id).action == "sent"
    assert fake.requests == []
    assert [m["body"] for m in sms_sink.messages()] == ["Reminder: call at 3"]


def test_without_an_api_key_the_template_renderer_serves_over_http(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, database_url: str
) -> None:
    settings = Settings.from_env({})
    assert isinstance(bootstrap.build_renderer(settings), TemplateRenderer)
    c = bootstrap.Container(settings, store=store, tasks=tasks, sms=twilio_sender, clock=VirtualClock(T0))
    previous = bootstrap.install(c)
    try:
        client = create_app("schedule_message", MAIN).test_client()
        user = make_user(store)
        body = {
            "userId": str(user),
            "agentId": "coach",
            "messageData": {"type": "weekly_check_in", "style": "supportive", "workouts": 3},
        }
        resp = client.post("/", json=body)
        again = client.post("/", json=body | {"idempotencyKey": "k"})
    finally:
        bootstrap.install(previous)
    assert resp.status_code == 201, resp.get_json()
    first = row(database_url, uuid.UUID(resp.get_json()["messageId"]))["final_message"]
    second = row(database_url, uuid.UUID(again.get_json()["messageId"]))["final_message"]
    assert first and first == second and "{" not in first and len(first) <= Settings().render_max_length


@pytest.mark.parametrize(
    ("message_data", "field"),
    [
        ({"style": "snarky"}, "messageData.type"),
        ({"type": "x", "style": "rude"}, "messageData.style"),
        ({"type": "x", "content": 5}, "messageData.content"),
        ({}, "messageData.type"),
    ],
)
def test_a_bad_structured_message_is_a_400(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    claude: ClaudeRenderer,
    message_data: dict[str, Any],
    field: str,
) -> None:
    from shared.errors import ValidationError

    user = make_user(store)
    with pytest.raises(ValidationError) as err:
        schedule(store, tasks, claude, user, T0, message_data)
    assert field in [e["field"] for e in err.value.errors]


def test_structured_parts_of_a_sequence_are_rendered_when_scheduled(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store)
    fake.script(text("Sam said yes!"))
    body = {
        "userId": str(user),
        "agentId": "concierge_agent",
        "sequence": [
            {"type": "intro_match", "name": "Sam"},
            {"content": "Want me to book it?", "delaySeconds": 2},
        ],
    }
    result = service.schedule(body, store=store, tasks=tasks, config=POLICY, now=T0, renderer=claude)
    assert [p.content for p in result.message.parts] == ["Sam said yes!", "Want me to book it?"]
    assert result.message.parts[0].data == {"type": "intro_match", "name": "Sam"}
    outcome = service.deliver(
        {"messageId": str(result.message.id), "generation": 0},
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=POLICY,
        clock=clock,
        sleep=lambda s: clock.advance(timedelta(seconds=s)),
        renderer=claude,
    )
    assert outcome.action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["Sam said yes!", "Want me to book it?"]
    logged = [a for a in actions(database_url, result.message.id) if a[0] == "rendered"]
    assert [a[2]["part"] for a in logged] == [1]


def test_a_structured_part_whose_render_failed_is_rendered_at_delivery(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    fake: FakeAnthropic,
    claude: ClaudeRenderer,
    database_url: str,
) -> None:
    user = make_user(store)
    fake.script(status(529), status(500), text("Alex is in too."))
    body = {
        "userId": str(user),
        "agentId": "concierge_agent",
        "sequence": [{"content": "News!"}, {"type": "second_match", "name": "Alex", "delaySeconds": 1}],
    }
    result = service.schedule(body, store=store, tasks=tasks, config=POLICY, now=T0, renderer=claude)
    assert [p.content for p in result.message.parts] == ["News!", ""]

    def run() -> Outcome:
        return service.deliver(
            {
                "messageId": str(result.message.id),
                "generation": store.get_message(result.message.id).generation,
            },  # type: ignore[union-attr]
            store=store,
            tasks=tasks,
            sms=twilio_sender,
            config=POLICY,
            clock=clock,
            sleep=lambda s: clock.advance(timedelta(seconds=s)),
            renderer=claude,
        )

    first = run()
    assert (first.action, first.reason) == ("deferred", "render_unavailable") and sms_sink.messages() == []
    assert first.scheduled_for is not None
    clock.now = first.scheduled_for
    assert run().action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["News!", "Alex is in too."]
    parts = sql(database_url, "select content, status from message_parts order by position")
    assert parts == [("News!", "sent"), ("Alex is in too.", "sent")]


def test_a_replayed_structured_request_costs_no_model_call(
    store: PostgresStore, tasks: RecordingTaskQueue, fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    """A retried request with the same idempotency key is answered from the stored message before
    anything is rendered: one model call for the message, not one per retry."""
    user = make_user(store, "America/New_York")
    fake.script(text("Sam said yes: The Blue Door at 8."))
    first = schedule(store, tasks, claude, user, T0, STRUCTURED, idempotencyKey="turn-9")
    replay = schedule(
        store, tasks, claude, user, T0 + timedelta(seconds=5), STRUCTURED, idempotencyKey="turn-9"
    )
    assert first.created and not replay.created
    assert replay.message.id == first.message.id
    assert replay.message.content == "Sam said yes: The Blue Door at 8."
    assert len(fake.requests) == 1
    assert len(tasks.tasks) == 1


def test_without_a_model_a_reply_holds_back_every_fresh_context_message_and_says_why(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    """No ANTHROPIC_API_KEY: the agent asked for its message to be checked against the user's reply,
    and nothing can check it, so it is superseded rather than sent out of place; the event tells
    the agent why, and a message that did not ask is sent as usual."""
    renderer = bootstrap.build_renderer(Settings.from_env({}))
    user = make_user(store)
    fresh = [
        schedule(store, tasks, renderer, user, T0, {"content": text}, requiresFreshContext=True).message.id
        for text in ("Still looking for a dinner spot?", "Sam is free at 8")
    ]
    plain = schedule(store, tasks, renderer, user, T0, {"content": "Your code is 1234"}).message.id
    store.record_inbound(user, "what time again?", "SM" + uuid.uuid4().hex, T0 + timedelta(minutes=1))
    clock.advance(timedelta(minutes=5))

    outcomes = [deliver(store, tasks, twilio_sender, renderer, clock, m).action for m in fresh]
    planned = store.get_message(plain)
    assert planned is not None and planned.scheduled_for is not None
    clock.advance(max(planned.scheduled_for - clock(), timedelta(0)))  # it waited its turn, unchecked
    outcomes.append(deliver(store, tasks, twilio_sender, renderer, clock, plain).action)

    assert outcomes == ["superseded", "superseded", "sent"]
    assert [m["body"] for m in sms_sink.messages()] == ["Your code is 1234"]
    for m in fresh:
        assert "ANTHROPIC_API_KEY unset" in row(database_url, m)["superseded_reason"]
    events = sql(database_url, "select payload from events_outbox where event_type = 'message.superseded'")
    assert sorted(e[0]["messageId"] for e in events) == sorted(str(m) for m in fresh)
    assert all("no model" in e[0]["explanation"] for e in events)


def test_without_a_model_a_fresh_context_message_with_no_reply_since_is_sent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
) -> None:
    renderer = bootstrap.build_renderer(Settings.from_env({}))
    user = make_user(store)
    make_active(store, user, T0 - timedelta(hours=1))  # a reply before it was queued does not count
    m = schedule(store, tasks, renderer, user, T0, {"content": "Sam is free at 8"}, requiresFreshContext=True)
    clock.advance(timedelta(minutes=5))
    assert deliver(store, tasks, twilio_sender, renderer, clock, m.message.id).action == "sent"
    assert [s["body"] for s in sms_sink.messages()] == ["Sam is free at 8"]
