"""One behaviour suite for the Store, run against both adapters on a fresh, real, migrated database:

- "postgres": PostgresStore (psycopg) straight to PostgreSQL;
- "supabase": SupabaseStore (supabase-py rpc) over HTTP to the local PostgREST stand-in
  (tests/support/postgrest.py), which calls the same SQL functions on the same database.

Then the supabase store's HTTP boundary (the exact RPC calls, headers, error translation) and the
psycopg store's unreachable-database translation. Time is a virtual clock: every instant is passed in.
"""

from __future__ import annotations

import socket
import time as wall
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from supabase import create_client

from shared.domain import Limits, Reservation, Segments
from shared.errors import NotFound, OrchestratorError, StoreUnavailable, Unavailable, ValidationError
from shared.models import Claim, MessageFilter, NewMessage
from shared.parsing import ScheduleRequest
from shared.store.postgres import PostgresStore
from shared.store.supabase import SupabaseStore
from tests.support.constants import T0
from tests.support.postgrest import PostgrestStandIn

SERVICE_KEY = "test-service-key"
LIMITS = Limits()  # cooldown 30 s, hourly 2, daily 10
LEASE = 120

AnyStore = PostgresStore | SupabaseStore


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def postgrest(database_url: str) -> Iterator[PostgrestStandIn]:
    stand_in = PostgrestStandIn(database_url, service_key=SERVICE_KEY)
    yield stand_in
    stand_in.stop()


@pytest.fixture
def supabase_store(postgrest: PostgrestStandIn) -> Iterator[SupabaseStore]:
    store = SupabaseStore.connect(postgrest.url, SERVICE_KEY)
    yield store
    store.close()


@pytest.fixture(params=["postgres", "supabase"])
def store(request: pytest.FixtureRequest, database_url: str) -> Iterator[AnyStore]:
    if request.param == "supabase":
        yield request.getfixturevalue("supabase_store")
        return
    pg = PostgresStore(database_url)
    yield pg
    pg.close()


# --- helpers ---------------------------------------------------------------------------------------


def make_user(store: AnyStore, phone: str = "+15550000001", tz: str = "UTC", **settings: Any) -> uuid.UUID:
    return uuid.UUID(store.upsert_user(phone, tz, **settings)["id"])


def new_message(
    user_id: uuid.UUID,
    *,
    now: datetime = T0,
    at: datetime | None = None,
    content: str = "hello",
    agent: str = "agent-1",
    reason: str = "ok",
    **fields: Any,
) -> NewMessage:
    body: dict[str, Any] = {"userId": str(user_id), "agentId": agent, "messageData": {"content": content}}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    request = ScheduleRequest.parse(body, now=now)
    return NewMessage(request=request, scheduled_for=at or now, reason=reason, now=now)


def enqueue(store: AnyStore, user_id: uuid.UUID, **kwargs: Any) -> uuid.UUID:
    result = store.enqueue(new_message(user_id, **kwargs))
    assert result.created
    return result.message.id


def day_of(at: datetime) -> tuple[datetime, datetime]:
    start = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def claim(
    store: AnyStore,
    message_id: uuid.UUID,
    now: datetime,
    *,
    generation: int = 0,
    limits: Limits = LIMITS,
    daily_cap: int | None = None,
    day: tuple[datetime, datetime] | None = None,
) -> Claim:
    start, end = day or day_of(now)
    return store.claim(
        message_id,
        generation,
        now,
        limits=limits,
        daily_cap=limits.daily_limit if daily_cap is None else daily_cap,
        day_start=start,
        day_end=end,
        lease_seconds=LEASE,
    )


def send(store: AnyStore, user_id: uuid.UUID, at: datetime, **claim_args: Any) -> uuid.UUID:
    """A message that went out at `at`: enqueued, claimed and recorded sent at that instant."""
    message_id = enqueue(store, user_id, now=at)
    got = claim(store, message_id, at, **claim_args)
    assert got.claimed, got
    assert got.token is not None
    sid = "SM" + uuid.uuid4().hex
    assert store.record_sent(
        message_id, got.token, sid=sid, body="sent text", now=at, local_date=str(at.date())
    )
    return message_id


def status_of(store: AnyStore, message_id: uuid.UUID) -> str:
    message = store.get_message(message_id)
    assert message is not None
    return message.status


# --- user_context ----------------------------------------------------------------------------------


def test_user_context_of_an_unknown_user_is_none(store: AnyStore) -> None:
    make_user(store)
    assert store.user_context(uuid.uuid4(), T0) is None


def test_user_context_with_an_idempotency_key_answers_the_message_stored_under_it(store: AnyStore) -> None:
    user_id = make_user(store)
    stored = enqueue(store, user_id, idempotencyKey="turn-1")
    enqueue(store, user_id, idempotencyKey="turn-2")
    ctx = store.user_context(user_id, T0, idempotency=("agent-1", "turn-1"))
    assert ctx is not None and ctx.replay is not None
    assert ctx.replay.id == stored
    assert ctx.replay.request_hash == new_message(user_id, idempotencyKey="turn-1").request.request_hash
    for other in (("agent-1", "turn-3"), ("agent-2", "turn-1")):  # unused key; another agent's key
        fresh = store.user_context(user_id, T0, idempotency=other)
        assert fresh is not None and fresh.replay is None
        assert [r.at for r in fresh.history.reservations] == [T0, T0]


def test_user_context_decodes_the_settings(store: AnyStore) -> None:
    user_id = make_user(
        store,
        "+15550000002",
        "America/New_York",
        quiet_hours_start=time(21, 0),
        quiet_hours_end=time(7, 30),
        quiet_hours_enabled=False,
        daily_limit=5,
        hourly_limit=1,
    )
    ctx = store.user_context(user_id, T0)
    assert ctx is not None
    assert ctx.user_id == user_id
    assert ctx.phone_number == "+15550000002"
    s = ctx.settings
    assert (s.timezone, s.quiet_hours_start, s.quiet_hours_end) == ("America/New_York", time(21), time(7, 30))
    assert (s.quiet_hours_enabled, s.daily_limit, s.hourly_limit, s.opted_out) == (False, 5, 1, False)
    assert ctx.history.sends == []
    assert ctx.history.reservations == []
    assert ctx.history.last_inbound_at is None


def test_user_context_defaults_and_upsert_by_phone(store: AnyStore) -> None:
    first = make_user(store, "+15550000003", "Europe/Paris", daily_limit=3)
    again = make_user(store, "+15550000003", "Asia/Tokyo")
    assert again == first
    ctx = store.user_context(first, T0)
    assert ctx is not None
    s = ctx.settings
    assert s.timezone == "Asia/Tokyo"
    assert (s.quiet_hours_start, s.quiet_hours_end, s.quiet_hours_enabled) == (None, None, True)
    assert (s.daily_limit, s.hourly_limit) == (None, None)


def test_user_context_history_sends_reservations_and_last_inbound(store: AnyStore) -> None:
    user_id = make_user(store)
    other = make_user(store, "+15550000009")
    send(store, user_id, T0 - timedelta(days=8, hours=1))  # older than the 8-day window: left out
    send(store, user_id, T0 - timedelta(hours=2))
    send(store, other, T0 - timedelta(hours=1))  # someone else's
    sending = enqueue(store, user_id, now=T0 - timedelta(minutes=1))
    assert claim(store, sending, T0 - timedelta(minutes=1)).claimed  # a claim counts as a send
    later = enqueue(store, user_id, at=T0 + timedelta(hours=2), priority="low")
    sooner = enqueue(store, user_id, at=T0 + timedelta(hours=1), priority="high")
    enqueue(store, other, at=T0 + timedelta(minutes=5))
    store.record_inbound(user_id, "hi", "SMin1", T0 - timedelta(minutes=5))
    store.record_inbound(user_id, "later", "SMin2", T0 + timedelta(minutes=5))  # after now: not yet
    store.record_inbound(other, "other", "SMin3", T0 - timedelta(minutes=1))

    ctx = store.user_context(user_id, T0)
    assert ctx is not None
    assert ctx.history.sends == [T0 - timedelta(hours=2), T0 - timedelta(minutes=1)]
    assert ctx.history.reservations == [
        Reservation(at=T0 + timedelta(hours=1), priority="high"),
        Reservation(at=T0 + timedelta(hours=2), priority="low"),
    ]
    assert ctx.history.last_inbound_at == T0 - timedelta(minutes=5)

    excluded = store.user_context(user_id, T0, exclude=sooner)
    assert excluded is not None
    assert excluded.history.reservations == [Reservation(at=T0 + timedelta(hours=2), priority="low")]
    assert later != sooner


def test_user_context_of_an_opted_out_user(store: AnyStore, db: psycopg.Connection[Any]) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id)
    db.execute("update users set opted_out_at = %s where id = %s", [T0 - timedelta(days=1), user_id])
    ctx = store.user_context(user_id, T0)
    assert ctx is not None and ctx.settings.opted_out
    got = claim(store, message_id, T0)
    assert (got.claimed, got.reason, got.token) == (False, "opted_out", None)


# --- enqueue / get_message / delivery_context ------------------------------------------------------


def test_enqueue_creates_a_queued_message(store: AnyStore) -> None:
    user_id = make_user(store)
    message = new_message(
        user_id,
        at=T0 + timedelta(minutes=10),
        reason="cooldown",
        content="Your order shipped",
        priority="high",
        canDelay=False,
        requiresFreshContext=True,
        expiresAt="2025-06-02T18:00:00+02:00",
    )
    result = store.enqueue(message)
    assert result.created is True
    m = result.message
    assert (m.user_id, m.agent_id, m.status, m.priority) == (user_id, "agent-1", "queued", "high")
    assert m.content == "Your order shipped"
    assert m.scheduled_for == T0 + timedelta(minutes=10)
    assert m.can_delay is False
    assert (m.generation, m.attempts, m.reason, m.last_error) == (0, 0, "cooldown", None)
    assert m.expires_at == datetime(2025, 6, 2, 16, 0, tzinfo=UTC)
    assert (m.sent_at, m.twilio_message_sid, m.conversation_id) == (None, None, None)
    assert m.created_at == T0
    assert m.request_hash == message.request.request_hash
    assert result.request_hash == message.request.request_hash
    assert store.get_message(m.id) == m


def test_text_and_json_round_trip_unchanged(store: AnyStore) -> None:
    user_id = make_user(store)
    content = 'Hi "Ana" \\ it\'s 20% off — ok?\n😀 {"not": "json"}'
    result = store.enqueue(new_message(user_id, content=content, idempotencyKey="ключ/ü 1"))
    again = store.enqueue(new_message(user_id, content="other", idempotencyKey="ключ/ü 1"))
    assert (again.created, again.message.id) == (False, result.message.id)
    got = store.get_message(result.message.id)
    assert got is not None and got.content == content
    token = claim(store, got.id, T0).token
    assert token is not None
    assert store.record_sent(got.id, token, sid="SM'1", body=content + "!", now=T0, local_date="2025-06-02")
    sent = store.get_message(got.id)
    assert sent is not None and (sent.content, sent.twilio_message_sid) == (content + "!", "SM'1")


def test_enqueue_with_a_used_idempotency_key_returns_the_original(store: AnyStore) -> None:
    user_id = make_user(store)
    first_request = new_message(user_id, idempotencyKey="key-1", content="first")
    first = store.enqueue(first_request)
    retry = new_message(user_id, now=T0 + timedelta(seconds=5), idempotencyKey="key-1", content="second")
    second = store.enqueue(retry)
    assert first.created is True
    assert second.created is False
    assert second.message.id == first.message.id
    assert second.message.content == "first"
    assert second.request_hash == first_request.request.request_hash != retry.request.request_hash
    assert second.message.created_at == T0

    ctx = store.user_context(user_id, T0)
    assert ctx is not None and len(ctx.history.reservations) == 1
    # The key is per agent: another agent's message with the same key is a new one.
    third = store.enqueue(new_message(user_id, idempotencyKey="key-1", agent="agent-2"))
    assert third.created is True and third.message.id != first.message.id


def test_enqueue_for_an_unknown_user_is_not_found(store: AnyStore) -> None:
    make_user(store)
    with pytest.raises(NotFound):
        store.enqueue(new_message(uuid.uuid4()))


def test_enqueue_checks_the_conversation_belongs_to_the_user(store: AnyStore) -> None:
    user_id = make_user(store)
    other = make_user(store, "+15550000009")
    with pytest.raises(ValidationError) as unknown:
        store.enqueue(new_message(user_id, conversationId=str(uuid.uuid4())))
    assert unknown.value.errors[0]["field"] == "conversationId"
    others = store.record_inbound(other, "hi", "SMo", T0)["conversationId"]
    with pytest.raises(ValidationError):
        store.enqueue(new_message(user_id, conversationId=others))

    own = store.record_inbound(user_id, "hi", "SMu", T0)["conversationId"]
    result = store.enqueue(new_message(user_id, conversationId=own))
    assert result.created and result.message.conversation_id == uuid.UUID(own)


def test_get_message(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id, at=T0 + timedelta(hours=1), content="ping")
    assert store.get_message(uuid.uuid4()) is None
    got = store.get_message(message_id)
    assert got is not None
    assert (got.id, got.user_id, got.status, got.content) == (message_id, user_id, "queued", "ping")
    assert got.scheduled_for == T0 + timedelta(hours=1)


def test_delivery_context(store: AnyStore) -> None:
    user_id = make_user(store, tz="Europe/Berlin")
    message_id = enqueue(store, user_id, at=T0, content="now")
    other = enqueue(store, user_id, at=T0 + timedelta(hours=3))
    due = enqueue(store, user_id, at=T0 - timedelta(minutes=1), priority="high")
    send(store, user_id, T0 - timedelta(hours=1))
    store.record_inbound(user_id, "yo", "SMin", T0 - timedelta(minutes=2))
    assert store.delivery_context(uuid.uuid4(), T0) is None

    ctx = store.delivery_context(message_id, T0)
    assert ctx is not None
    assert (ctx.message.id, ctx.message.content, ctx.message.status) == (message_id, "now", "queued")
    assert ctx.user.user_id == user_id
    assert ctx.user.settings.timezone == "Europe/Berlin"
    assert ctx.user.history.sends == [T0 - timedelta(hours=1)]
    # Only what is due: the delivery-time check reads no later reservation (it would only make a
    # delivery's cost grow with its user's backlog).
    assert ctx.user.history.reservations == [Reservation(at=T0 - timedelta(minutes=1), priority="high")]
    assert ctx.user.history.last_inbound_at == T0 - timedelta(minutes=2)
    planning = store.user_context(user_id, T0, exclude=message_id)
    assert planning is not None
    assert planning.history.reservations == [
        Reservation(at=T0 - timedelta(minutes=1), priority="high"),
        Reservation(at=T0 + timedelta(hours=3), priority="medium"),
    ]
    refreshed = store.user_context(user_id, T0, exclude=message_id, due_only=True)
    assert refreshed is not None
    assert refreshed.history.reservations == ctx.user.history.reservations
    assert len({other, due, message_id}) == 3


# --- claim -----------------------------------------------------------------------------------------


def test_claim_moves_the_message_to_sending(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id)
    got = claim(store, message_id, T0)
    assert (got.claimed, got.reason, got.status, got.attempts) == (True, "ok", "sending", 1)
    assert isinstance(got.token, uuid.UUID)
    stored = store.get_message(message_id)
    assert stored is not None
    assert (stored.status, stored.attempts, stored.reason) == ("sending", 1, "sending")
    ctx = store.user_context(user_id, T0)
    assert ctx is not None and ctx.history.sends == [T0]


def test_a_second_claim_for_the_user_at_the_same_instant_is_refused(store: AnyStore) -> None:
    user_id = make_user(store)
    first = enqueue(store, user_id)
    second = enqueue(store, user_id)
    assert claim(store, first, T0).claimed
    got = claim(store, second, T0)
    assert got.claimed is False
    assert got.reason in ("in_flight", "cooldown")
    assert (got.token, got.status) == (None, "queued")
    assert status_of(store, second) == "queued"
    # Another user is not affected.
    other_user = make_user(store, "+15550000009")
    assert claim(store, enqueue(store, other_user), T0).claimed


def test_claim_refuses_stale_tasks_non_queued_and_unknown_messages(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id)
    stale = claim(store, message_id, T0, generation=1)
    assert (stale.claimed, stale.reason, stale.status) == (False, "stale_task", "queued")
    assert claim(store, message_id, T0).claimed
    again = claim(store, message_id, T0)
    assert (again.claimed, again.reason, again.status) == (False, "not_queued", "sending")
    unknown = claim(store, uuid.uuid4(), T0)
    assert (unknown.claimed, unknown.reason) == (False, "not_found")


def test_claim_refuses_an_expired_message(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id, expiresAt="2025-06-02T16:00:00Z")
    got = claim(store, message_id, T0 + timedelta(hours=1))
    assert (got.claimed, got.reason) == (False, "expired")
    assert claim(store, message_id, T0 + timedelta(minutes=59)).claimed


def test_claim_respects_the_cooldown(store: AnyStore) -> None:
    user_id = make_user(store)
    send(store, user_id, T0)
    message_id = enqueue(store, user_id, now=T0)
    early = claim(store, message_id, T0 + timedelta(seconds=10))
    assert (early.claimed, early.reason) == (False, "cooldown")
    assert claim(store, message_id, T0 + timedelta(seconds=29)).reason == "cooldown"
    assert claim(store, message_id, T0 + timedelta(seconds=30)).claimed


def test_claim_respects_the_hourly_limit(store: AnyStore) -> None:
    user_id = make_user(store)
    send(store, user_id, T0)
    send(store, user_id, T0 + timedelta(minutes=10))
    message_id = enqueue(store, user_id, now=T0)
    refused = claim(store, message_id, T0 + timedelta(minutes=20))
    assert (refused.claimed, refused.reason) == (False, "hourly_limit")
    assert claim(store, message_id, T0 + timedelta(minutes=59)).reason == "hourly_limit"
    # A cooldown of 0 and a higher limit let it through: the limits are the caller's.
    relaxed = Limits(cooldown_seconds=0, hourly_limit=3)
    assert claim(store, message_id, T0 + timedelta(minutes=20), limits=relaxed).claimed


def test_claim_hourly_window_slides(store: AnyStore) -> None:
    user_id = make_user(store)
    send(store, user_id, T0)
    send(store, user_id, T0 + timedelta(minutes=10))
    message_id = enqueue(store, user_id, now=T0)
    assert claim(store, message_id, T0 + timedelta(minutes=60)).claimed  # T0 left the hour


def test_claim_counts_the_daily_cap_between_day_start_and_day_end(store: AnyStore) -> None:
    user_id = make_user(store)
    limits = Limits(hourly_limit=10)
    send(store, user_id, T0, limits=limits)  # 15:00
    send(store, user_id, T0 + timedelta(hours=2), limits=limits)  # 17:00
    message_id = enqueue(store, user_id, now=T0)
    at = T0 + timedelta(hours=4)  # 19:00
    full_day = claim(store, message_id, at, limits=limits, daily_cap=2)
    assert (full_day.claimed, full_day.reason) == (False, "daily_limit")
    # day_start is inclusive: the 17:00 send counts in a day starting at 17:00.
    from_five = (T0 + timedelta(hours=2), T0 + timedelta(hours=26))
    assert claim(store, message_id, at, limits=limits, daily_cap=1, day=from_five).reason == "daily_limit"
    # A day starting at 18:00 leaves both sends (15:00, 17:00) in the day before.
    from_six = (T0 + timedelta(hours=3), T0 + timedelta(hours=27))
    assert claim(store, message_id, at, limits=limits, daily_cap=1, day=from_six).claimed


def test_claim_day_end_is_exclusive(store: AnyStore) -> None:
    user_id = make_user(store)
    limits = Limits(hourly_limit=10)
    send(store, user_id, T0, limits=limits)
    send(store, user_id, T0 + timedelta(hours=2), limits=limits)
    message_id = enqueue(store, user_id, now=T0)
    until_five = (T0 - timedelta(hours=20), T0 + timedelta(hours=2))  # counts 15:00 only
    got = claim(store, message_id, T0 + timedelta(hours=4), limits=limits, daily_cap=2, day=until_five)
    assert got.claimed, got


# --- reschedule ------------------------------------------------------------------------------------


def test_reschedule_bumps_the_generation_and_refuses_a_stale_one(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id)
    at = T0 + timedelta(hours=1)
    assert store.reschedule(message_id, 0, at, "quiet_hours", T0) == 1
    stored = store.get_message(message_id)
    assert stored is not None
    assert (stored.generation, stored.scheduled_for, stored.reason) == (1, at, "quiet_hours")
    assert stored.updated_at == T0
    assert store.reschedule(message_id, 0, at + timedelta(hours=1), "cooldown", T0) is None
    assert store.get_message(message_id) == stored
    assert claim(store, message_id, at, generation=0).reason == "stale_task"
    assert store.reschedule(message_id, 1, at + timedelta(minutes=5), "hourly_limit", T0) == 2
    assert claim(store, message_id, at, generation=2).claimed
    assert store.reschedule(message_id, 2, at, "again", at) is None  # no longer queued
    assert store.reschedule(uuid.uuid4(), 0, at, "x", T0) is None


# --- record_sent -----------------------------------------------------------------------------------


def test_record_sent(store: AnyStore, db: psycopg.Connection[Any]) -> None:
    user_id = make_user(store, tz="Pacific/Auckland")
    message_id = enqueue(store, user_id)
    got = claim(store, message_id, T0)
    assert got.token is not None
    sent_at = T0 + timedelta(seconds=2)
    # 15:00 UTC is 03:00 the next day in Auckland: the budget is keyed by the local date given.
    assert store.record_sent(
        message_id, got.token, sid="SM1", body="final text", now=sent_at, local_date="2025-06-03"
    )

    stored = store.get_message(message_id)
    assert stored is not None
    assert (stored.status, stored.sent_at, stored.twilio_message_sid) == ("sent", sent_at, "SM1")
    assert (stored.content, stored.reason, stored.last_error) == ("final text", "sent", None)
    assert stored.conversation_id is not None
    conversation = db.execute(
        "select user_id, last_message_at from conversations where id = %s", [stored.conversation_id]
    ).fetchone()
    assert conversation == (user_id, sent_at)
    rows = db.execute(
        "select direction, content, status, twilio_message_sid, message_queue_id, conversation_id, sent_at"
        " from messages where user_id = %s",
        [user_id],
    ).fetchall()
    assert rows == [("outbound", "final text", "sent", "SM1", message_id, stored.conversation_id, sent_at)]
    budget = db.execute(
        "select date, messages_sent, last_message_at from user_message_budget where user_id = %s", [user_id]
    ).fetchall()
    assert budget == [(date(2025, 6, 3), 1, sent_at)]
    ctx = store.user_context(user_id, sent_at)
    assert ctx is not None and ctx.history.sends == [sent_at]

    # A second send the same local day: same conversation, the counter goes to 2.
    later = T0 + timedelta(minutes=5)
    second = enqueue(store, user_id, now=later)
    got2 = claim(store, second, later)
    assert got2.token is not None
    assert store.record_sent(second, got2.token, sid="SM2", body="two", now=later, local_date="2025-06-03")
    stored2 = store.get_message(second)
    assert stored2 is not None and stored2.conversation_id == stored.conversation_id
    assert db.execute(
        "select messages_sent, last_message_at from user_message_budget where user_id = %s and date = %s",
        [user_id, date(2025, 6, 3)],
    ).fetchone() == (2, later)

    # A final message is not recorded again.
    assert not store.record_sent(
        message_id, got.token, sid="SM3", body="x", now=later, local_date="2025-06-03"
    )
    assert db.execute("select count(*) from messages where user_id = %s", [user_id]).fetchone() == (2,)


def test_record_sent_keeps_the_given_conversation(store: AnyStore) -> None:
    user_id = make_user(store)
    store.record_inbound(user_id, "hi", "SMa", T0 - timedelta(hours=1))  # an active conversation
    chosen = store.record_inbound(user_id, "hi", "SMb", T0 - timedelta(minutes=1))["conversationId"]
    message_id = enqueue(store, user_id, conversationId=chosen)
    got = claim(store, message_id, T0)
    assert got.token is not None
    assert store.record_sent(message_id, got.token, sid="SMx", body="b", now=T0, local_date="2025-06-02")
    stored = store.get_message(message_id)
    assert stored is not None and stored.conversation_id == uuid.UUID(chosen)


# --- release / fail / expire -----------------------------------------------------------------------


def test_release_gives_the_claim_back(store: AnyStore) -> None:
    user_id = make_user(store)
    first = enqueue(store, user_id)
    second = enqueue(store, user_id)
    got = claim(store, first, T0)
    assert got.token is not None
    later = T0 + timedelta(seconds=1)
    assert store.release(first, got.token, error="twilio 503", now=later, max_attempts=3) == "queued"
    stored = store.get_message(first)
    assert stored is not None
    assert (stored.status, stored.reason, stored.last_error, stored.attempts) == (
        "queued",
        "retry",
        "twilio 503",
        1,
    )
    # The slot is free: no send counted, and the user's next message can be claimed at once.
    ctx = store.user_context(user_id, later)
    assert ctx is not None and ctx.history.sends == []
    got2 = claim(store, second, later)
    assert got2.claimed and got2.token is not None
    # A release with another token changes nothing and answers the current status.
    assert store.release(second, uuid.uuid4(), error="x", now=later, max_attempts=3) == "sending"
    assert status_of(store, second) == "sending"
    # The released message is claimed again later: a second attempt.
    assert store.release(second, got2.token, error="timeout", now=later, max_attempts=3) == "queued"
    again = claim(store, first, later + timedelta(seconds=1))
    assert (again.claimed, again.attempts) == (True, 2)


def test_release_after_max_attempts_fails_the_message(store: AnyStore) -> None:
    user_id = make_user(store)
    message_id = enqueue(store, user_id)
    for attempt in range(1, 3):
        now = T0 + timedelta(minutes=attempt)
        got = claim(store, message_id, now)
        assert got.token is not None and got.attempts == attempt
        expected = "queued" if attempt < 2 else "failed"
        assert store.release(message_id, got.token, error=f"e{attempt}", now=now, max_attempts=2) == expected
    stored = store.get_message(message_id)
    assert stored is not None
    assert (stored.status, stored.reason, stored.last_error, stored.attempts) == (
        "failed",
        "attempts_exhausted",
        "e2",
        2,
    )


def test_fail(store: AnyStore) -> None:
    user_id = make_user(store)
    queued = enqueue(store, user_id)
    assert store.fail(queued, error="21211", reason="invalid_number", now=T0) is True
    stored = store.get_message(queued)
    assert stored is not None
    assert (stored.status, stored.reason, stored.last_error, stored.updated_at) == (
        "failed",
        "invalid_number",
        "21211",
        T0,
    )
    assert store.fail(queued, error="again", reason="x", now=T0) is False
    assert store.fail(uuid.uuid4(), error="x", reason="x", now=T0) is False

    sending = enqueue(store, user_id)
    assert claim(store, sending, T0).claimed
    assert store.fail(sending, error="21610", reason="opted_out", now=T0) is True
    assert status_of(store, sending) == "failed"
    ctx = store.user_context(user_id, T0)
    assert ctx is not None and ctx.history.sends == []  # the slot no longer counts


def test_inbound_keywords_change_consent_and_write_the_ledger(store: AnyStore) -> None:
    phone = "+15550000061"
    stop = store.inbound(
        phone, "Stop texting me!", "SMk1", keyword="stop", source="phrase", num_media=0, now=T0
    )
    assert (stop["optedOut"], stop["keyword"], stop["source"], stop["duplicate"]) == (
        True,
        "stop",
        "phrase",
        False,
    )
    user_id = uuid.UUID(stop["userId"])
    later = T0 + timedelta(minutes=1)
    start = store.inbound(phone, "START", "SMk2", keyword="start", source=None, num_media=0, now=later)
    assert (start["optedOut"], start["source"]) == (False, "keyword")  # no source given: a keyword
    store.inbound(phone, "help", "SMk3", keyword="help", source="keyword", num_media=0, now=later)
    store.inbound(phone, "thanks", "SMk4", keyword=None, source=None, num_media=0, now=later)
    again = store.inbound(
        phone, "Stop texting me!", "SMk1", keyword="stop", source="phrase", num_media=0, now=later
    )
    assert again["duplicate"] is True  # a repeated webhook: no second ledger row

    history = store.consent_history(user_id, 10)
    assert history is not None and (history.user_id, history.opted_out_at) == (user_id, None)
    assert [(e.event, e.source, e.raw_text, e.message_sid, e.occurred_at) for e in history.events] == [
        ("help", "keyword", "help", "SMk3", later),
        ("opt_in", "keyword", "START", "SMk2", later),
        ("opt_out", "phrase", "Stop texting me!", "SMk1", T0),
    ]
    assert all(isinstance(e.id, int) and isinstance(e.created_at, datetime) for e in history.events)
    newest = store.consent_history(user_id, 1)
    assert newest is not None and [e.event for e in newest.events] == ["help"]
    assert store.consent_history(uuid.uuid4(), 10) is None


def test_enqueue_stores_the_plans_blocked_by_and_what_it_superseded_for_a_replay(store: AnyStore) -> None:
    user_id = make_user(store)
    older = enqueue(store, user_id, topicKey="weather")
    message = new_message(user_id, topicKey="weather", idempotencyKey="k", reason="quiet_hours")
    first = store.enqueue(replace(message, blocked_by=("cooldown", "quiet_hours")))
    assert first.created and first.superseded == (older,)
    assert (first.message.blocked_by, first.message.superseded_ids) == (("cooldown", "quiet_hours"), (older,))
    # Both replays answer them: before planning (mq_user_context), and a race lost at the insert.
    ctx = store.user_context(user_id, T0, idempotency=("agent-1", "k"))
    assert ctx is not None and ctx.replay is not None
    assert (ctx.replay.blocked_by, ctx.replay.superseded_ids) == (("cooldown", "quiet_hours"), (older,))
    raced = store.enqueue(message)
    assert not raced.created and raced.message == first.message
    plain = store.get_message(older)
    assert plain is not None and (plain.blocked_by, plain.superseded_ids) == ((), ())


def test_list_messages_newest_first_filtered_scoped_and_keyset_paged(store: AnyStore) -> None:
    user_id = make_user(store)
    other_user = make_user(store, phone="+15550000002")
    enqueue(store, other_user, now=T0)  # another user's: never listed
    first = enqueue(store, user_id, now=T0, agent="a1", topicKey="weather")
    second = enqueue(store, user_id, now=T0 + timedelta(seconds=1), agent="a2")
    # Two rows at one instant: the id decides their order, and the page boundary between them.
    tied = sorted(
        (enqueue(store, user_id, now=T0 + timedelta(seconds=2), agent="a1") for _ in range(2)),
        reverse=True,
    )
    assert store.cancel(second, agent_id="a2", reason=None, now=T0 + timedelta(seconds=3)).cancelled

    every = MessageFilter(agent_ids=None)
    listed = store.list_messages(user_id, 10, every)
    assert listed is not None and [m.id for m in listed] == [*tied, second, first]
    assert [m.user_id for m in listed] == [user_id] * 4 and listed[-1].topic_key == "weather"
    assert listed[0].delivery_status is None and listed[0].timeline == ()

    page = store.list_messages(user_id, 2, every)
    assert page is not None and [m.id for m in page] == tied
    last = page[-1]
    assert last.created_at is not None
    rest = store.list_messages(user_id, 10, replace(every, before=(last.created_at, last.id)))
    assert rest is not None and [m.id for m in rest] == [second, first]

    def ids(**which: Any) -> list[uuid.UUID]:
        found = store.list_messages(user_id, 10, MessageFilter(**({"agent_ids": None} | which)))
        assert found is not None
        return [m.id for m in found]

    assert ids(status="cancelled") == [second]
    assert ids(agent_id="a1") == [*tied, first]
    assert ids(topic_key="weather") == [first]
    assert ids(agent_ids=frozenset({"a2"})) == [second]
    assert ids(agent_ids=frozenset({"a2"}), agent_id="a1") == []  # the filter cannot widen the scope
    assert ids(agent_ids=frozenset()) == []
    assert store.list_messages(uuid.uuid4(), 10, every) is None


def test_fail_opted_out_fails_the_message_and_opts_the_user_out(store: AnyStore) -> None:
    user_id = make_user(store)
    sending = enqueue(store, user_id)
    queued = enqueue(store, user_id, now=T0 + timedelta(minutes=5))
    assert claim(store, sending, T0).claimed
    error = "twilio 21610: Attempt to send to unsubscribed recipient"
    assert store.fail_opted_out(sending, error=error, now=T0) is True
    stored = store.get_message(sending)
    assert stored is not None and (stored.status, stored.reason, stored.last_error) == (
        "failed",
        "opted_out",
        error,
    )
    cancelled = store.get_message(queued)
    assert cancelled is not None and (cancelled.status, cancelled.reason) == ("cancelled", "opted_out")
    ctx = store.user_context(user_id, T0)
    assert ctx is not None and ctx.settings.opted_out
    history = store.consent_history(user_id, 10)
    assert history is not None and history.opted_out_at == T0
    assert [(e.event, e.source, e.raw_text, e.message_sid) for e in history.events] == [
        ("opt_out", "twilio_21610", error, None)
    ]
    assert store.fail_opted_out(sending, error=error, now=T0) is False  # final already: nothing more
    again = store.consent_history(user_id, 10)
    assert again is not None and len(again.events) == 1


def test_expire(store: AnyStore) -> None:
    user_id = make_user(store)
    expiring = enqueue(store, user_id, expiresAt="2025-06-02T16:00:00Z")
    lasting = enqueue(store, user_id)
    later = T0 + timedelta(hours=2)
    assert store.expire(expiring, later) is True
    stored = store.get_message(expiring)
    assert stored is not None and (stored.status, stored.reason, stored.updated_at) == (
        "expired",
        "expired",
        later,
    )
    assert store.expire(expiring, later) is False
    assert store.expire(lasting, later) is False  # no expires_at: never expired
    assert status_of(store, lasting) == "queued"
    assert store.expire(uuid.uuid4(), later) is False


def test_record_inbound_is_deduplicated_by_sid(store: AnyStore) -> None:
    user_id = make_user(store)
    first = store.record_inbound(user_id, "hello", "SMdup", T0)
    assert first["recorded"] is True and first["messageId"] is not None
    second = store.record_inbound(user_id, "hello", "SMdup", T0 + timedelta(seconds=1))
    assert second["recorded"] is False
    assert second["conversationId"] == first["conversationId"]


def test_invalid_input_is_a_store_error_not_a_library_error(store: AnyStore) -> None:
    with pytest.raises(OrchestratorError) as caught:
        store.upsert_user("not-a-phone", "UTC")  # users_phone_e164 check constraint
    assert type(caught.value).__name__ == "StoreError"
    assert not isinstance(caught.value, Unavailable)


# --- the supabase store at its HTTP boundary -------------------------------------------------------


def _parameter_names(db: psycopg.Connection[Any], function: str) -> set[str]:
    row = db.execute("select proargnames from pg_proc where proname = %s", [function]).fetchone()
    assert row is not None
    return set(row[0])


def test_a_sequence_is_one_row_with_its_parts_recorded_one_by_one(store: AnyStore) -> None:
    user_id = make_user(store)
    parts = [{"content": "one"}, {"content": "two", "delaySeconds": 4}, {"content": "three"}]
    result = store.enqueue(new_message(user_id, messageData=None, sequence=parts))
    m = result.message
    assert [(p.position, p.content, p.delay_seconds, p.status) for p in m.parts] == [
        (1, "one", 1, "pending"),
        (2, "two", 4, "pending"),
        (3, "three", 1, "pending"),
    ]
    got = claim(store, m.id, T0)
    assert got.claimed and got.token is not None
    # Not all parts sent: the message cannot be recorded sent yet.
    assert not store.record_sent(m.id, got.token, sid="SMx", body="b", now=T0, local_date="2025-06-02")
    for position in (1, 2, 3):
        assert store.record_part(m.id, got.token, position=position, sid=f"SMp{position}", now=T0)
    assert store.record_part(m.id, got.token, position=2, sid="SMp2", now=T0)  # idempotent
    assert not store.record_part(m.id, got.token, position=2, sid="SMother", now=T0)
    assert store.record_sent(m.id, got.token, sid="", body="b", now=T0, local_date="2025-06-02")
    sent = store.get_message(m.id)
    assert sent is not None and sent.status == "sent" and sent.twilio_message_sid == "SMp3"
    assert all(p.sent for p in sent.parts)
    ctx = store.user_context(user_id, T0 + timedelta(seconds=1))
    assert ctx is not None and len(ctx.history.sends) == 1  # the sequence counts once


def test_segments_are_stored_with_every_text_and_read_back(store: AnyStore) -> None:
    user_id = make_user(store)
    single = store.enqueue(new_message(user_id, content="a" * 159 + "\U0001f600")).message
    assert single.segments == Segments("UCS-2", 3)
    parts = [{"content": "one"}, {"type": "intro"}, {"content": "Ж" * 71}]
    sequence = store.enqueue(new_message(user_id, messageData=None, sequence=parts)).message
    assert [p.segments for p in sequence.parts] == [Segments("GSM-7", 1), None, Segments("UCS-2", 2)]
    assert sequence.segments is None  # a part is still to render
    assert store.record_part_render(sequence.id, 2, "a" * 200, {"model": "m"}, T0)
    rendered = store.get_message(sequence.id)
    assert rendered is not None and rendered.parts[1].segments == Segments("GSM-7", 2)
    assert rendered.segments == Segments("UCS-2", 5)
    structured = store.enqueue(new_message(user_id, messageData={"type": "intro"})).message
    assert structured.segments is None
    assert store.record_render(structured.id, "€" * 81, {"model": "m"}, T0)
    again = store.get_message(structured.id)
    assert again is not None and again.segments == Segments("GSM-7", 2)


def test_a_topic_supersedes_only_the_agents_older_queued_messages(store: AnyStore) -> None:
    user_id = make_user(store)
    old = enqueue(store, user_id, topicKey="t")
    other_agent = enqueue(store, user_id, topicKey="t", agent="agent-2")
    new = store.enqueue(new_message(user_id, topicKey="t"))
    assert new.superseded == (old,)
    superseded = store.get_message(old)
    assert superseded is not None and superseded.status == "superseded"
    assert superseded.superseded_by == new.message.id
    assert status_of(store, other_agent) == "queued"


def test_cancel(store: AnyStore) -> None:
    user_id = make_user(store)
    a = enqueue(store, user_id)
    assert store.cancel(a, agent_id="someone", reason=None, now=T0).error == "not_owner"
    done = store.cancel(a, agent_id="agent-1", reason="why", now=T0)
    assert done.cancelled and not done.already and done.message is not None
    assert done.message.status == "cancelled" and done.message.last_error == "why"
    again = store.cancel(a, agent_id=None, reason=None, now=T0)
    assert again.cancelled and again.already
    b = send(store, user_id, T0 + timedelta(minutes=5))
    refused = store.cancel(b, agent_id=None, reason=None, now=T0)
    assert (refused.cancelled, refused.error, refused.status) == (False, "not_queued", "sent")
    with pytest.raises(NotFound):
        store.cancel(uuid.uuid4(), agent_id=None, reason=None, now=T0)


def test_render_bookkeeping(store: AnyStore, db: psycopg.Connection[Any]) -> None:
    user_id = make_user(store)
    store.record_inbound(user_id, "hi", "SMc1", T0 - timedelta(minutes=2))
    store.record_inbound(user_id, "there", "SMc2", T0 - timedelta(minutes=1))
    assert [(t.direction, t.content) for t in store.conversation(user_id, 1)] == [("inbound", "there")]
    assert [t.content for t in store.conversation(user_id, 10)] == ["hi", "there"]

    a = enqueue(store, user_id, messageData={"type": "intro"})
    usage = {"model": "claude-haiku-4-5", "inputTokens": 10, "latencyMs": 42, "costUsd": 0.001}
    assert store.record_render(a, "Hello Sam", usage, T0)
    rendered = store.get_message(a)
    assert rendered is not None and rendered.content == "Hello Sam" and rendered.structured
    logged = db.execute(
        "select input_data, latency_ms from agent_actions_log"
        " where message_id = %s and action_type = 'rendered'",
        (a,),
    ).fetchone()
    assert logged == (usage, 42)

    b = enqueue(store, user_id, messageData={"type": "intro"})
    assert store.render_failed(b, error="e1", usage={}, max_attempts=2, now=T0) == ("queued", 1)
    assert store.render_failed(b, error="e2", usage={}, max_attempts=2, now=T0) == ("failed", 2)
    assert status_of(store, b) == "failed"

    c = enqueue(store, user_id)
    assert store.supersede_stale(c, reason="x" * 300, usage={"model": "m"}, now=T0)
    stale = store.get_message(c)
    assert stale is not None and stale.status == "superseded" and stale.reason == "stale"
    assert not store.supersede_stale(c, reason="again", usage={}, now=T0)
    reason = db.execute("select superseded_reason from message_queue where id = %s", (c,)).fetchone()
    assert reason == ("x" * 200,)


def test_claim_is_one_rpc_with_the_sql_parameter_names(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn
) -> None:
    user_id = make_user(supabase_store)
    message_id = enqueue(supabase_store, user_id)
    postgrest.clear()
    new_york = ZoneInfo("America/New_York")
    got = supabase_store.claim(
        message_id,
        0,
        T0.astimezone(new_york),
        limits=Limits(cooldown_seconds=45, hourly_limit=3),
        daily_cap=7,
        day_start=datetime(2025, 6, 2, tzinfo=new_york),
        day_end=datetime(2025, 6, 3, tzinfo=new_york),
        lease_seconds=90,
    )
    assert got.claimed
    [call] = postgrest.requests
    assert (call.method, call.path, call.query) == ("POST", "/rest/v1/rpc/mq_claim", "")
    assert call.body == {
        "p_message_id": str(message_id),
        "p_generation": 0,
        "p_now": "2025-06-02T11:00:00-04:00",
        "p_lease_seconds": 90,
        "p_cooldown_seconds": 45,
        "p_hourly_limit": 3,
        "p_daily_cap": 7,
        "p_day_start": "2025-06-02T00:00:00-04:00",
        "p_day_end": "2025-06-03T00:00:00-04:00",
        "p_weekly_cap": None,
        "p_week_start": None,
        "p_week_end": None,
        "p_account": None,
    }
    assert call.headers["apikey"] == SERVICE_KEY
    assert call.headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert call.headers["content-type"] == "application/json"


def test_enqueue_sends_jsonb_as_json_and_nulls_explicitly(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn
) -> None:
    user_id = make_user(supabase_store)
    postgrest.clear()
    message = new_message(user_id, at=T0 + timedelta(minutes=1), idempotencyKey="k", content="hi there")
    supabase_store.enqueue(message)
    [call] = postgrest.rpc_calls()
    assert call.path == "/rest/v1/rpc/mq_enqueue"
    assert call.body == {
        "p_user_id": str(user_id),
        "p_agent_id": "agent-1",
        "p_message_data": {"content": "hi there"},
        "p_final_message": "hi there",
        "p_scheduled_for": "2025-06-02T15:01:00+00:00",
        "p_priority": "medium",
        "p_can_delay": True,
        "p_requires_fresh_context": False,
        "p_conversation_id": None,
        "p_idempotency_key": "k",
        "p_request_hash": message.request.request_hash,
        "p_expires_at": None,
        "p_reason": "ok",
        "p_now": "2025-06-02T15:00:00+00:00",
        "p_topic_key": None,
        "p_parts": None,
        "p_user_queue_limit": None,
        "p_agent_rate_per_minute": None,
        "p_transactional": False,
        "p_encoding": "GSM-7",
        "p_segments": 1,
        "p_blocked_by": [],
    }


def test_every_method_is_exactly_one_rpc_named_like_the_sql_function(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn, db: psycopg.Connection[Any]
) -> None:
    s = supabase_store
    user_id = make_user(s)
    a = enqueue(s, user_id, expiresAt="2025-06-03T00:00:00Z")
    b = enqueue(s, user_id)
    token = claim(s, b, T0).token
    assert token is not None
    calls: list[tuple[str, Callable[[], object]]] = [
        ("mq_user_context", lambda: s.user_context(user_id, T0, exclude=a)),
        ("mq_enqueue", lambda: s.enqueue(new_message(user_id))),
        ("mq_get", lambda: s.get_message(a)),
        ("mq_delivery_context", lambda: s.delivery_context(a, T0)),
        ("mq_claim", lambda: claim(s, a, T0)),
        ("mq_reschedule", lambda: s.reschedule(a, 0, T0, "r", T0)),
        ("mq_release", lambda: s.release(b, token, error="e", now=T0, max_attempts=5)),
        ("mq_fail", lambda: s.fail(b, error="e", reason="r", now=T0)),
        ("mq_fail_opted_out", lambda: s.fail_opted_out(b, error="e", now=T0)),
        (
            "mq_inbound",
            lambda: s.inbound(
                "+15550000088", "STOP", "SMk", keyword="stop", source="keyword", num_media=0, now=T0
            ),
        ),
        ("mq_consent_history", lambda: s.consent_history(user_id, 5)),
        ("mq_list_messages", lambda: s.list_messages(user_id, 5, MessageFilter(agent_ids=frozenset({"a"})))),
        ("mq_expire", lambda: s.expire(a, T0)),
        ("mq_record_inbound", lambda: s.record_inbound(user_id, "hi", "SMi", T0)),
        ("mq_set_timezone", lambda: s.set_timezone(user_id, "America/Chicago", source="user", now=T0)),
        ("mq_take_stale_claims", lambda: s.take_stale_claims(T0, lease_seconds=60, limit=5)),
        ("mq_requeue_claim", lambda: s.requeue_claim(b, token, reason="r", now=T0)),
        ("mq_hold_for_reconcile", lambda: s.hold_for_reconcile(b, token, error="e", reconcile_at=T0, now=T0)),
        ("mq_sweep_overdue", lambda: s.sweep_overdue(T0, grace_seconds=60, limit=5)),
        ("mq_sweep_horizon", lambda: s.sweep_horizon(T0, horizon_seconds=60, limit=5)),
        ("mq_sweep_expire", lambda: s.sweep_expire(T0, limit=5)),
        ("mq_record_sweep", lambda: s.record_sweep("t", T0, T0, {"expired": 0}, None)),
        ("mq_health", lambda: s.health(T0)),
        ("mq_record_part", lambda: s.record_part(b, token, position=1, sid="SMp", now=T0)),
        ("mq_cancel", lambda: s.cancel(a, agent_id=None, reason="r", now=T0)),
        ("mq_conversation", lambda: s.conversation(user_id, 5)),
        (
            "mq_log_model_call",
            lambda: s.log_model_call(user_id, a, "rendered", {"model": "m"}, None, None, T0),
        ),
        ("mq_record_render", lambda: s.record_render(a, "text", {"model": "m", "latencyMs": 5}, T0)),
        ("mq_render_failed", lambda: s.render_failed(a, error="e", usage={}, max_attempts=3, now=T0)),
        ("mq_supersede_stale", lambda: s.supersede_stale(a, reason="r", usage={}, now=T0)),
    ]
    for function, call in calls:
        postgrest.clear()
        call()
        assert [r.path for r in postgrest.requests] == [f"/rest/v1/rpc/{function}"]
        assert set(postgrest.requests[0].body) == _parameter_names(db, function), function

    c = enqueue(s, user_id, now=T0 + timedelta(minutes=5))
    token_c = claim(s, c, T0 + timedelta(minutes=5)).token
    assert token_c is not None
    postgrest.clear()
    assert s.record_sent(c, token_c, sid="SMs", body="b", now=T0, local_date="2025-06-02")
    [call] = postgrest.requests
    assert call.path == "/rest/v1/rpc/mq_record_sent"
    assert call.body == {
        "p_message_id": str(c),
        "p_token": str(token_c),
        "p_sid": "SMs",
        "p_body": "b",
        "p_now": "2025-06-02T15:00:00+00:00",
        "p_local_date": "2025-06-02",
        "p_reconciled": False,
    }

    postgrest.clear()
    s.upsert_user("+15550000077", "UTC", quiet_hours_start=time(23, 0), daily_limit=4)
    [call] = postgrest.requests
    assert call.path == "/rest/v1/rpc/mq_upsert_user"
    assert call.body == {
        "p_phone_number": "+15550000077",
        "p_timezone": "UTC",
        "p_quiet_hours_start": "23:00:00",
        "p_daily_limit": 4,
    }


def test_results_decode_the_scalar_json_postgrest_returns(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn
) -> None:
    """PostgREST answers a scalar function with the value itself: null, a string, a number, a bool."""
    user_id = make_user(supabase_store)
    message_id = enqueue(supabase_store, user_id)
    token = claim(supabase_store, message_id, T0).token
    assert token is not None
    assert supabase_store.get_message(uuid.uuid4()) is None  # body: null
    assert supabase_store.reschedule(uuid.uuid4(), 0, T0, "r", T0) is None  # body: null
    assert supabase_store.release(message_id, token, error="e", now=T0, max_attempts=3) == "queued"
    assert supabase_store.reschedule(message_id, 0, T0, "r", T0) == 1  # body: 1
    assert supabase_store.fail(message_id, error="e", reason="r", now=T0) is True  # body: true
    assert supabase_store.fail(message_id, error="e", reason="r", now=T0) is False  # body: false
    assert len(postgrest.rpc_calls("mq_fail")) == 2


def test_503_is_store_unavailable_and_not_retried(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn
) -> None:
    user_id = make_user(supabase_store)
    postgrest.unavailable = True
    postgrest.clear()
    with pytest.raises(StoreUnavailable):
        supabase_store.user_context(user_id, T0)
    assert len(postgrest.requests) == 1  # a POST is never retried behind the caller's back
    postgrest.unavailable = False
    assert supabase_store.user_context(user_id, T0) is not None


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, b"<html>Bad Gateway</html>"),
        (504, b'{"message": "upstream timed out"}'),
        (500, b'{"code": "XX000", "message": "internal error", "details": null, "hint": null}'),
    ],
)
def test_5xx_of_any_shape_is_store_unavailable(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn, status: int, body: bytes
) -> None:
    postgrest.fail_status, postgrest.fail_body = status, body
    with pytest.raises(StoreUnavailable):
        supabase_store.get_message(uuid.uuid4())


@pytest.mark.filterwarnings("ignore:The '(timeout|verify)' parameter is deprecated:DeprecationWarning")
def test_a_client_built_elsewhere_still_maps_postgrest_outage_codes(postgrest: PostgrestStandIn) -> None:
    store = SupabaseStore(create_client(postgrest.url, SERVICE_KEY))
    postgrest.unavailable = True  # 503 with PostgREST's PGRST001 body
    with pytest.raises(StoreUnavailable):
        store.get_message(uuid.uuid4())
    postgrest.unavailable = False
    with pytest.raises(OrchestratorError) as caught:
        store.upsert_user("bad", "UTC")
    assert type(caught.value).__name__ == "StoreError"
    store.close()


def test_naive_datetimes_are_refused_before_any_call(
    supabase_store: SupabaseStore, postgrest: PostgrestStandIn
) -> None:
    postgrest.clear()
    with pytest.raises(ValueError, match="naive"):
        supabase_store.expire(uuid.uuid4(), datetime(2025, 6, 2, 15, 0))
    assert postgrest.requests == []


def test_an_unreachable_api_is_store_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free now, and nothing listens on it
    store = SupabaseStore.connect(f"http://127.0.0.1:{port}", SERVICE_KEY, timeout=1.0)
    with pytest.raises(StoreUnavailable) as caught:
        store.get_message(uuid.uuid4())
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    store.close()


def test_a_timeout_is_store_unavailable(postgrest: PostgrestStandIn) -> None:
    store = SupabaseStore.connect(postgrest.url, SERVICE_KEY, timeout=0.2)
    postgrest.delay_seconds = 1.0
    with pytest.raises(StoreUnavailable) as caught:
        store.get_message(uuid.uuid4())
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    postgrest.delay_seconds = 0.0
    store.close()


def test_a_refused_call_is_a_store_error(supabase_store: SupabaseStore, postgrest: PostgrestStandIn) -> None:
    postgrest.clear()
    with pytest.raises(OrchestratorError) as caught:
        supabase_store.call("mq_no_such_function", x=1)
    assert type(caught.value).__name__ == "StoreError"
    assert "PGRST202" in caught.value.message
    with pytest.raises(OrchestratorError) as bad_arg:
        supabase_store.call("mq_get", message_id="not-a-uuid")
    assert not isinstance(bad_arg.value, Unavailable)
    assert "22P02" in bad_arg.value.message


def test_the_stand_in_answers_like_postgrest(postgrest: PostgrestStandIn) -> None:
    url = f"{postgrest.url}/rest/v1/rpc/mq_get"
    auth = {"apikey": SERVICE_KEY, "Authorization": f"Bearer {SERVICE_KEY}"}
    with httpx.Client() as http:
        assert http.post(url, json={"p_message_id": str(uuid.uuid4())}).status_code == 401
        no_bearer = http.post(url, json={"p_message_id": str(uuid.uuid4())}, headers={"apikey": SERVICE_KEY})
        assert no_bearer.status_code == 401
        found = http.post(url, json={"p_message_id": str(uuid.uuid4())}, headers=auth)
        assert (found.status_code, found.json()) == (200, None)
        unknown_arg = http.post(url, json={"p_nope": 1}, headers=auth)
        assert unknown_arg.status_code == 404 and unknown_arg.json()["code"] == "PGRST202"
        missing_arg = http.post(url, json={}, headers=auth)
        assert missing_arg.status_code == 404 and missing_arg.json()["code"] == "PGRST202"
        bad_value = http.post(url, json={"p_message_id": "x"}, headers=auth)
        assert (bad_value.status_code, bad_value.json()["code"]) == (400, "22P02")
        budget = f"{postgrest.url}/rest/v1/rpc/increment_message_budget"
        nobody = http.post(
            budget, json={"p_user_id": str(uuid.uuid4()), "p_date": "2025-06-02"}, headers=auth
        )
        assert nobody.status_code == 409 and nobody.json()["code"] == "23503"  # foreign key violation
        user = http.post(
            f"{postgrest.url}/rest/v1/rpc/mq_upsert_user",
            json={"p_phone_number": "+15550000042", "p_timezone": "UTC"},
            headers=auth,
        )
        assert user.status_code == 200 and user.json()["phone_number"] == "+15550000042"
        void = http.post(budget, json={"p_user_id": user.json()["id"], "p_date": "2025-06-02"}, headers=auth)
        assert (void.status_code, void.content) == (204, b"")
    # Refused requests are recorded too, with the headers as sent.
    assert [r.headers.get("apikey") for r in postgrest.requests[:3]] == [None, SERVICE_KEY, SERVICE_KEY]
    assert [r.headers.get("authorization") for r in postgrest.requests[:2]] == [None, None]


# --- the psycopg store -----------------------------------------------------------------------------


def test_postgres_store_on_a_closed_port_is_store_unavailable_quickly() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/x", timeout=0.5)
    started = wall.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            store.get_message(uuid.uuid4())
    finally:
        store.close()
    assert wall.monotonic() - started < 5  # bounded by the pool timeout, not a hang
