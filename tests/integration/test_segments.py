"""SMS segments end to end (issue 15): what schedule_message answers and GET shows for GSM-7, UCS-2
and emoji texts and for a sequence, what the rows hold, the MAX_SEGMENTS_PER_MESSAGE refusal, and
SMART_ENCODING changing the text that reaches Twilio (the SMS sink's record). Through
functions-framework's app on real Postgres, the real twilio client against the sink, time virtual."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.domain import AccountCaps, Limits
from shared.models import Claim, NewMessage
from shared.parsing import ScheduleRequest
from shared.render import ClaudeRenderer
from shared.store.driver import Json
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, T0
from tests.support.factories import make_user, row, sql, table_counts
from tests.support.fake_anthropic import FakeAnthropic, text
from tests.support.fakes import VirtualClock

EMOJI = "\U0001f389"  # 🎉
CURLY = "\u201cSam\u201d said yes \u2014 it\u2019s at 7\u20138 pm\u2026 see you"
PLAIN = '"Sam" said yes - it\'s at 7-8 pm... see you'


@pytest.fixture
def schedule_client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


@pytest.fixture
def deliver_client(container: bootstrap.Container) -> FlaskClient:
    return create_app("deliver_message", MAIN).test_client()


def body(user: uuid.UUID, **fields: Any) -> dict[str, Any]:
    return {"userId": str(user), "agentId": "concierge_agent", "priority": "high", **fields}


def post(client: FlaskClient, payload: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/", json=payload)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    answer: dict[str, Any] = resp.get_json()
    return answer


def get(client: FlaskClient, message_id: str) -> dict[str, Any]:
    resp = client.get(f"/messages/{message_id}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer: dict[str, Any] = resp.get_json()
    return answer


def parts_of(database_url: str, message_id: str) -> list[tuple[Any, ...]]:
    return sql(
        database_url,
        "select position, encoding, segments from message_parts where message_id = %s order by position",
        message_id,
    )


@pytest.mark.parametrize(
    ("content", "encoding", "segments"),
    [
        ("Your intro request has been matched!", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("{price: 5€}" * 14 + "!!", "GSM-7", 2),  # 156 characters but 198 septets: { } € take 2
        ("Привет! " * 8 + "Пока", "UCS-2", 1),  # 68 characters
        ("Ж" * 71, "UCS-2", 2),
        ("a" * 159 + EMOJI, "UCS-2", 3),  # one emoji: 161 UTF-16 units, 67 a segment
        ("\u201cquoted\u201d", "UCS-2", 1),  # curly quotes are not GSM-7 without SMART_ENCODING
    ],
)
def test_schedule_and_get_answer_the_encoding_and_segments(
    schedule_client: FlaskClient,
    store: PostgresStore,
    database_url: str,
    content: str,
    encoding: str,
    segments: int,
) -> None:
    user = make_user(store)
    answer = post(schedule_client, body(user, messageData={"content": content}))
    assert (answer["encoding"], answer["segments"]) == (encoding, segments)
    shown = get(schedule_client, answer["messageId"])
    assert (shown["encoding"], shown["segments"], shown["parts"]) == (encoding, segments, None)
    stored = row(database_url, uuid.UUID(answer["messageId"]))
    assert (stored["encoding"], stored["segments"], stored["final_message"]) == (encoding, segments, content)


def test_a_sequence_answers_its_total_and_each_part(
    schedule_client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    sequence = [{"content": "Hello!"}, {"content": "Ж" * 71}, {"content": "a" * 161}]
    answer = post(schedule_client, body(user, sequence=sequence))
    # 1 + 2 + 2 segments; one UCS-2 part makes the sequence's encoding UCS-2
    assert (answer["parts"], answer["encoding"], answer["segments"]) == (3, "UCS-2", 5)
    shown = get(schedule_client, answer["messageId"])
    assert (shown["encoding"], shown["segments"]) == ("UCS-2", 5)
    assert [(p["position"], p["encoding"], p["segments"]) for p in shown["parts"]] == [
        (1, "GSM-7", 1),
        (2, "UCS-2", 2),
        (3, "GSM-7", 2),
    ]
    assert parts_of(database_url, answer["messageId"]) == [(1, "GSM-7", 1), (2, "UCS-2", 2), (3, "GSM-7", 2)]


def test_a_five_part_sequence_counts_its_segments_not_one_message(
    schedule_client: FlaskClient, store: PostgresStore
) -> None:
    user = make_user(store)
    # 1,530 GSM-7 characters are 10 segments each (the most allowed): 50 SMS for one "message".
    answer = post(schedule_client, body(user, sequence=[{"content": "a" * 1530}] * 5))
    assert (answer["encoding"], answer["segments"]) == ("GSM-7", 50)


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"messageData": {"content": "a" * 1531}}, "messageData.content", ["11 segments", "GSM-7"]),
        (
            {"messageData": {"content": EMOJI + "a" * 669}},  # 671 UTF-16 units: 11 segments of 67
            "messageData.content",
            ["11 segments", "UCS-2", EMOJI],
        ),
        (
            {"sequence": [{"content": "ok"}, {"content": "fine"}, {"content": "Ж" * 671}]},
            "sequence[2].content",
            ["11 segments", "UCS-2", "Ж"],
        ),
    ],
)
def test_content_over_the_segment_limit_is_a_400_naming_the_field(
    schedule_client: FlaskClient,
    store: PostgresStore,
    database_url: str,
    payload: dict[str, Any],
    field: str,
    words: list[str],
) -> None:
    user = make_user(store)
    before = table_counts(database_url)
    resp = schedule_client.post("/", json=body(user, **payload))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    answer = resp.get_json()
    assert answer["error"] == "invalid_request"
    [error] = answer["errors"]
    assert error["field"] == field
    assert all(w in error["reason"] for w in words), error["reason"]
    assert "at most 10" in error["reason"]
    assert table_counts(database_url) == before


def test_the_limit_is_the_setting_and_0_is_none(
    store: PostgresStore, tasks: Any, twilio_sender: Any, clock: VirtualClock
) -> None:
    user = make_user(store)
    for limit, long_ok in ((2, False), (0, True)):
        settings = Settings.from_env({"MAX_SEGMENTS_PER_MESSAGE": str(limit)})
        c = bootstrap.Container(settings, store=store, tasks=tasks, sms=twilio_sender, clock=clock)
        previous = bootstrap.install(c)
        try:
            client = create_app("schedule_message", MAIN).test_client()
            three = client.post("/", json=body(user, messageData={"content": "a" * 307}))
        finally:
            bootstrap.install(previous)
        assert three.status_code == (201 if long_ok else 400), three.get_json()


@pytest.fixture
def smart(
    store: PostgresStore, tasks: Any, twilio_sender: Any, clock: VirtualClock
) -> Iterator[bootstrap.Container]:
    """The functions with SMART_ENCODING=1."""
    settings = Settings.from_env({"SMART_ENCODING": "1"})
    c = bootstrap.Container(settings, store=store, tasks=tasks, sms=twilio_sender, clock=clock)
    previous = bootstrap.install(c)
    yield c
    bootstrap.install(previous)


def test_smart_encoding_sends_the_gsm7_look_alikes(
    smart: bootstrap.Container, store: PostgresStore, sms_sink: SmsSink, database_url: str
) -> None:
    client = create_app("schedule_message", MAIN).test_client()
    deliver = create_app("deliver_message", MAIN).test_client()
    user = make_user(store, phone="+15551234567")
    payload = body(user, messageData={"content": CURLY}, idempotencyKey="smart-1")
    answer = post(client, payload)
    assert (answer["encoding"], answer["segments"]) == ("GSM-7", 1)
    stored = row(database_url, uuid.UUID(answer["messageId"]))
    # What is sent is the replaced text; what the agent sent stays as it sent it.
    assert stored["final_message"] == PLAIN and stored["message_data"] == {"content": CURLY}
    assert get(client, answer["messageId"])["encoding"] == "GSM-7"

    sent = deliver.post("/", json={"messageId": answer["messageId"], "generation": 0})
    assert sent.status_code == 200 and sent.get_json()["action"] == "sent", sent.get_json()
    assert [m["body"] for m in sms_sink.messages(to="+15551234567")] == [PLAIN]

    # A retry of the same request is the same request (the digest is of what the agent sent).
    again = client.post("/", json=payload)
    assert again.status_code == 200 and again.get_json()["messageId"] == answer["messageId"]


def test_smart_encoding_in_a_sequence_and_what_it_cannot_replace(
    smart: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    client = create_app("schedule_message", MAIN).test_client()
    user = make_user(store)
    answer = post(client, body(user, sequence=[{"content": CURLY}, {"content": f"{CURLY} {EMOJI}"}]))
    # The emoji has no GSM-7 look-alike: that part stays UCS-2, with its quotes replaced all the same.
    assert [(p["content"], p["encoding"]) for p in get(client, answer["messageId"])["parts"]] == [
        (PLAIN, "GSM-7"),
        (f"{PLAIN} {EMOJI}", "UCS-2"),
    ]
    assert (answer["encoding"], answer["segments"]) == ("UCS-2", 2)
    message_data = row(database_url, uuid.UUID(answer["messageId"]))["message_data"]
    assert [p["content"] for p in message_data["sequence"]] == [CURLY, f"{CURLY} {EMOJI}"]


def test_without_smart_encoding_the_text_is_sent_as_written(
    schedule_client: FlaskClient,
    deliver_client: FlaskClient,
    store: PostgresStore,
    sms_sink: SmsSink,
) -> None:
    user = make_user(store, phone="+15557654321")
    answer = post(schedule_client, body(user, messageData={"content": CURLY}))
    assert (answer["encoding"], answer["segments"]) == ("UCS-2", 1)
    deliver_client.post("/", json={"messageId": answer["messageId"], "generation": 0})
    assert [m["body"] for m in sms_sink.messages(to="+15557654321")] == [CURLY]


def test_a_structured_text_is_counted_when_it_is_rendered(
    store: PostgresStore,
    tasks: Any,
    twilio_sender: Any,
    sms_sink: SmsSink,
    fake: FakeAnthropic,
    database_url: str,
) -> None:
    """Rendered when scheduled: counted then. With fresh context: unknown (null) until the render
    at delivery, which records its count; with SMART_ENCODING the rendered text is replaced too."""
    renderer = ClaudeRenderer(api_key="k", base_url=fake.url, model="claude-haiku-4-5", timeout_seconds=2)
    clock = VirtualClock(T0)
    settings = Settings.from_env({"SMART_ENCODING": "1"})
    c = bootstrap.Container(
        settings, store=store, tasks=tasks, sms=twilio_sender, clock=clock, renderer=renderer
    )
    previous = bootstrap.install(c)
    try:
        client = create_app("schedule_message", MAIN).test_client()
        deliver = create_app("deliver_message", MAIN).test_client()
        user = make_user(store, phone="+15550001111")
        structured = {"type": "intro_match", "name": "Sam"}
        # in order: `now` at schedule, the sequence's part at schedule, `later` at delivery
        fake.script(text(CURLY), text("Part two \u2014 done"), text(f"{EMOJI} Sam is in!"))

        now = post(client, body(user, messageData=structured))
        assert (now["encoding"], now["segments"]) == ("GSM-7", 1)
        assert row(database_url, uuid.UUID(now["messageId"]))["final_message"] == PLAIN

        later = post(client, body(user, messageData=structured, requiresFreshContext=True))
        assert (later["encoding"], later["segments"]) == (None, None)

        sequence = post(client, body(user, sequence=[{"content": "Hi"}, {"type": "x", "name": "Sam"}]))
        assert parts_of(database_url, sequence["messageId"]) == [(1, "GSM-7", 1), (2, "GSM-7", 1)]
        assert (sequence["encoding"], sequence["segments"]) == ("GSM-7", 2)

        for answer in (now, later):
            clock.advance(timedelta(minutes=5))
            got = deliver.post("/", json={"messageId": answer["messageId"], "generation": 0})
            assert got.get_json()["action"] == "sent", got.get_json()
        shown = get(client, later["messageId"])
        assert (shown["encoding"], shown["segments"]) == ("UCS-2", 1)
    finally:
        bootstrap.install(previous)
    assert [m["body"] for m in sms_sink.messages(to="+15550001111")] == [PLAIN, f"{EMOJI} Sam is in!"]


def test_a_part_rendered_at_delivery_completes_the_sequences_total(
    store: PostgresStore, db: psycopg.Connection[Any], database_url: str
) -> None:
    """mq_record_part_render counts the part and sums the sequence once every part is counted."""
    user = make_user(store)
    message_id = store.call(
        "mq_enqueue",
        user_id=user,
        agent_id="a",
        message_data=Json({"sequence": []}),
        final_message="Hi",
        scheduled_for=T0,
        priority="medium",
        can_delay=True,
        requires_fresh_context=True,
        conversation_id=None,
        idempotency_key=None,
        request_hash="h",
        expires_at=None,
        reason="ok",
        now=T0,
        parts=Json(
            [
                {"content": "Hi", "delay_seconds": 1, "encoding": "GSM-7", "segments": 1},
                {"content": "", "delay_seconds": 1, "data": {"type": "x"}},
            ]
        ),
    )["message"]["id"]
    assert _counts(db, message_id) == (None, None)  # one part not counted yet
    assert store.record_part_render(uuid.UUID(message_id), 2, "Ж" * 80, {"model": "m"}, T0)
    assert _counts(db, message_id) == ("UCS-2", 3)
    assert parts_of(database_url, message_id) == [(1, "GSM-7", 1), (2, "UCS-2", 2)]


def test_the_previous_releases_calls_still_work_and_store_no_count(
    store: PostgresStore, db: psycopg.Connection[Any]
) -> None:
    """Migrations run before the new code is deployed: the old calls, without the new parameters,
    still resolve (one function per name) and leave the count null rather than wrong."""
    user = make_user(store)
    created = db.execute(
        "select mq_enqueue(p_user_id => %s, p_agent_id => 'old', p_message_data => '{\"type\": \"x\"}',"
        " p_final_message => 'old text', p_scheduled_for => %s, p_priority => 'medium', p_can_delay => true,"
        " p_requires_fresh_context => false, p_conversation_id => null, p_idempotency_key => null,"
        " p_request_hash => 'h', p_expires_at => null, p_reason => 'ok', p_now => %s,"
        " p_user_queue_limit => 50, p_agent_rate_per_minute => 600)",
        (user, T0, T0),
    ).fetchone()
    assert created is not None
    message_id = created[0]["message"]["id"]
    assert _counts(db, message_id) == (None, None)
    # A new render records its count; an old release's render of the same row clears it again.
    assert store.record_render(uuid.UUID(message_id), "new text " + EMOJI, {"model": "m"}, T0)
    assert _counts(db, message_id) == ("UCS-2", 1)
    db.execute(
        "select mq_record_render(p_message_id => %s, p_text => 'older release', p_usage => '{}',"
        " p_now => %s)",
        (message_id, T0),
    )
    assert _counts(db, message_id) == (None, None)


def _counts(db: psycopg.Connection[Any], message_id: str) -> tuple[Any, ...]:
    found = db.execute("select encoding, segments from message_queue where id = %s", (message_id,)).fetchone()
    assert found is not None
    return tuple(found)


# --- account caps in segments (ACCOUNT_CAPS_UNIT=segments) -----------------------------------------


def _queued(store: PostgresStore, content: str, at: Any) -> uuid.UUID:
    user = make_user(store)
    req = ScheduleRequest.parse(
        {"userId": str(user), "agentId": "a", "messageData": {"content": content}}, now=at, max_segments=0
    )
    return store.enqueue(NewMessage(request=req, scheduled_for=at, reason="ok", now=at)).message.id


def _claim(store: PostgresStore, message_id: uuid.UUID, now: Any, caps: AccountCaps) -> Claim:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return store.claim(
        message_id,
        0,
        now,
        limits=Limits(),
        daily_cap=10,
        day_start=day,
        day_end=day + timedelta(days=1),
        lease_seconds=120,
        account=caps,
    )


@pytest.mark.parametrize("unit", ["messages", "segments"])
def test_the_account_rate_counts_segments_when_asked(store: PostgresStore, unit: str) -> None:
    """10 a second: a 6-segment message, then a 5-segment one does not fit the second (in
    segments), a 1-segment one does; in messages all three fit."""
    caps = AccountCaps(per_second=10, unit=unit)
    six = _queued(store, "a" * 900, T0 - timedelta(seconds=3))
    five = _queued(store, "b" * 700, T0 - timedelta(seconds=2))
    one = _queued(store, "c", T0 - timedelta(seconds=1))
    assert _claim(store, six, T0, caps).claimed
    second = _claim(store, five, T0, caps)
    assert _claim(store, one, T0, caps).claimed
    if unit == "messages":
        assert second.claimed
    else:
        assert (second.claimed, second.reason) == (False, "account_throughput")
        assert second.retry_at == T0 + timedelta(seconds=1)  # when the 6 segments leave the window
        assert _claim(store, five, T0 + timedelta(seconds=1), caps).claimed


def test_a_message_larger_than_a_cap_goes_when_the_window_is_empty(store: PostgresStore) -> None:
    caps = AccountCaps(per_second=3, daily=8, unit="segments")
    first = _queued(store, "x", T0 - timedelta(seconds=2))
    big = _queued(store, "a" * 900, T0 - timedelta(seconds=1))  # 6 segments, more than 3 a second
    assert _claim(store, first, T0, caps).claimed
    refused = _claim(store, big, T0, caps)
    assert (refused.claimed, refused.reason, refused.retry_at) == (
        False,
        "account_throughput",
        T0 + timedelta(seconds=1),
    )
    assert _claim(store, big, T0 + timedelta(seconds=1), caps).claimed  # alone in its second
    # The day holds 7 of 8 segments: a 2-segment message waits a day for the first to leave.
    two = _queued(store, "a" * 200, T0 + timedelta(seconds=2))
    daily = _claim(store, two, T0 + timedelta(seconds=5), caps)
    assert (daily.claimed, daily.reason) == (False, "account_daily_limit")
    assert daily.retry_at == T0 + timedelta(days=1)


@pytest.mark.parametrize(("unit", "sent"), [("messages", 3), ("segments", 2)])
def test_deliveries_under_an_account_rate_in_segments(
    store: PostgresStore,
    tasks: Any,
    twilio_sender: Any,
    sms_sink: SmsSink,
    unit: str,
    sent: int,
) -> None:
    env = {"ACCOUNT_RATE_PER_SECOND": "10", "ACCOUNT_CAPS_UNIT": unit}
    c = bootstrap.Container(
        Settings.from_env(env), store=store, tasks=tasks, sms=twilio_sender, clock=VirtualClock(T0)
    )
    previous = bootstrap.install(c)
    try:
        client = create_app("schedule_message", MAIN).test_client()
        deliver = create_app("deliver_message", MAIN).test_client()
        ids = [
            post(client, body(make_user(store), messageData={"content": text}))["messageId"]
            for text in ("a" * 900, "b" * 700, "c")
        ]
        actions = [
            deliver.post("/", json={"messageId": i, "generation": 0}).get_json()["action"] for i in ids
        ]
    finally:
        bootstrap.install(previous)
    assert actions.count("sent") == sent == len(sms_sink.messages())
    if unit == "segments":
        assert actions == ["sent", "deferred", "sent"]
