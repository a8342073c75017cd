"""Opt-out, opt-in and help, and the consent ledger (issue 15), through the real functions: Twilio's
webhook signed with its real algorithm, schedule_message and deliver_message through
functions-framework's app, real Postgres, the real twilio client against the local SMS sink.

- every keyword and revocation phrase opts out (or in, or asks for help) with its ledger row, the
  raw text published to agents; near-misses change nothing;
- the optional TwiML replies, on and off;
- Twilio's 21610 on a send fails the message and opts the user out; the next schedule is 409;
- the consent history operators read over HTTP, and who may read it;
- the ledger row and the change it records are one transaction: neither without the other."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from werkzeug.test import TestResponse

from shared import bootstrap
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.errors import StoreError
from shared.identity import IDENTITY_HEADER
from shared.store.postgres import PostgresStore
from shared.twilio_forms import HELP_WORDS, START_WORDS, STOP_WORDS
from tests.integration.test_conversations import TOKEN, client, inbound_form, signed_post
from tests.support.constants import T0
from tests.support.factories import make_user, row, sql
from tests.support.fakes import VirtualClock

UNSUBSCRIBED = "+15005550004"  # the sink answers 21610 for it, as Twilio's magic number does


@pytest.fixture
def container_settings() -> Settings:
    return Settings(twilio_auth_token=TOKEN)


@contextmanager
def settings(container: bootstrap.Container, new: Settings) -> Iterator[None]:
    """The functions run with `new` settings (the same adapters) inside the block."""
    c = bootstrap.Container(
        new, store=container.store, tasks=container.tasks, sms=container.sms, clock=container.clock
    )
    previous = bootstrap.install(c)
    try:
        yield
    finally:
        bootstrap.install(previous)


def schedule(user: uuid.UUID, content: str = "news!") -> TestResponse:
    body = {"userId": str(user), "agentId": "concierge", "messageData": {"content": content}}
    return client("schedule_message").post("/", json=body)


def scheduled(user: uuid.UUID, content: str = "news!") -> str:
    resp = schedule(user, content)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json()["messageId"])


def deliver(message_id: str) -> TestResponse:
    return client("deliver_message").post("/", json={"messageId": message_id})


def history(user: uuid.UUID | str, query: str = "", headers: dict[str, str] | None = None) -> TestResponse:
    return client("schedule_message").get(f"/users/{user}/consent{query}", headers=headers or {})


def ledger(database_url: str, user: uuid.UUID) -> list[tuple[Any, ...]]:
    return sql(
        database_url,
        "select event, source, raw_text, message_sid, occurred_at from consent_events"
        " where user_id = %s order by id",
        user,
    )


def inbound_events(database_url: str) -> list[dict[str, Any]]:
    rows = sql(
        database_url, "select payload from events_outbox where event_type = 'inbound_message' order by id"
    )
    return [r[0] for r in rows]


def opted_out_at(database_url: str, user: uuid.UUID) -> Any:
    [(at,)] = sql(database_url, "select opted_out_at from users where id = %s", user)
    return at


# --- every keyword and phrase ----------------------------------------------------------------------

OPT_OUTS = [
    *[(w, "keyword") for w in sorted(STOP_WORDS)],
    *[(w.lower() + "!", "keyword") for w in sorted(STOP_WORDS)],
    ("  Stop.  ", "keyword"),
    ("opt   out", "keyword"),
    ("stop texting me", "phrase"),
    ("Stop messaging me!", "phrase"),
    ("unsubscribe me", "phrase"),
    ("don\u2019t text me", "phrase"),
    ("Do not text me.", "phrase"),
    ("remove me from this list please", "phrase"),
    ("Stop texting me, please", "phrase"),
    ("please stop", "phrase"),
    ("opt-out", "phrase"),
]


@pytest.mark.parametrize(("body", "source"), OPT_OUTS)
def test_every_opt_out_keyword_and_phrase_opts_out_with_its_ledger_row(
    container: bootstrap.Container, store: PostgresStore, database_url: str, body: str, source: str
) -> None:
    phone = "+15553340001"
    user = make_user(store, phone=phone)
    queued = scheduled(user)
    form = inbound_form(phone, body)
    resp = signed_post("twilio_inbound", form)
    assert resp.status_code == 200 and resp.get_data(as_text=True).endswith("<Response></Response>")
    assert opted_out_at(database_url, user) == T0
    assert (
        row(database_url, uuid.UUID(queued))["status"],
        row(database_url, uuid.UUID(queued))["reason"],
    ) == (
        "cancelled",
        "opted_out",
    )
    assert ledger(database_url, user) == [("opt_out", source, body, form["MessageSid"], T0)]
    # Agents learn of it: the raw text, what it meant and the state after it.
    [published] = inbound_events(database_url)
    assert published["body"] == body
    assert (published["keyword"], published["keywordSource"], published["optedOut"]) == ("stop", source, True)
    refused = schedule(user)
    assert refused.status_code == 409 and refused.get_json()["error"] == "opted_out"


@pytest.mark.parametrize("body", [*sorted(START_WORDS), "start!", " Unstop. ", "yes"])
def test_every_opt_in_keyword_opts_back_in_with_its_ledger_row(
    container: bootstrap.Container, store: PostgresStore, database_url: str, body: str
) -> None:
    phone = "+15553340002"
    user = make_user(store, phone=phone)
    sql(database_url, "update users set opted_out_at = %s where id = %s", T0 - timedelta(days=1), user)
    form = inbound_form(phone, body)
    assert signed_post("twilio_inbound", form).status_code == 200
    assert opted_out_at(database_url, user) is None
    assert ledger(database_url, user) == [("opt_in", "keyword", body, form["MessageSid"], T0)]
    assert inbound_events(database_url)[0]["optedOut"] is False
    assert schedule(user).status_code == 201


@pytest.mark.parametrize("body", [*sorted(HELP_WORDS), "help?", "Info."])
def test_help_keywords_are_recorded_and_change_nothing(
    container: bootstrap.Container, store: PostgresStore, database_url: str, body: str
) -> None:
    phone = "+15553340003"
    user = make_user(store, phone=phone)
    queued = scheduled(user)
    form = inbound_form(phone, body)
    assert signed_post("twilio_inbound", form).status_code == 200
    assert opted_out_at(database_url, user) is None
    assert row(database_url, uuid.UUID(queued))["status"] == "queued"
    assert ledger(database_url, user) == [("help", "keyword", body, form["MessageSid"], T0)]
    assert inbound_events(database_url)[0]["keyword"] == "help"


@pytest.mark.parametrize(
    "body",
    ["stop by tomorrow", "don't stop", "Can you stop at 5?", "stop texting me so late", "cancel my booking",
     "yes please, book it", "help me pick", "the end of the road", "S T O P", "🛑"],
)  # fmt: skip
def test_near_misses_change_nothing_and_reach_the_agent_as_conversation(
    container: bootstrap.Container, store: PostgresStore, database_url: str, body: str
) -> None:
    phone = "+15553340004"
    user = make_user(store, phone=phone)
    queued = scheduled(user)
    assert signed_post("twilio_inbound", inbound_form(phone, body)).status_code == 200
    assert opted_out_at(database_url, user) is None
    assert row(database_url, uuid.UUID(queued))["status"] == "queued"
    assert ledger(database_url, user) == []
    [published] = inbound_events(database_url)
    assert (published["body"], published["keyword"], published["optedOut"]) == (body, None, False)


def test_a_stop_from_a_number_never_seen_creates_the_user_opted_out(
    container: bootstrap.Container, database_url: str
) -> None:
    form = inbound_form("+15553340005", "STOP")
    assert signed_post("twilio_inbound", form).status_code == 200
    [(user, at)] = sql(database_url, "select id, opted_out_at from users")
    assert at == T0
    assert ledger(database_url, user) == [("opt_out", "keyword", "STOP", form["MessageSid"], T0)]


# --- TwiML replies ---------------------------------------------------------------------------------

REPLIES = replace(
    Settings(twilio_auth_token=TOKEN),
    stop_reply="You're unsubscribed from Acme <alerts> & news. Reply START to resume.",
    start_reply="Welcome back! Reply STOP to opt out.",
    help_reply="Acme: help at acme.example. Msg&data rates may apply. Reply STOP to opt out.",
)


def reply_text(resp: TestResponse) -> str | None:
    """The one <Message> of a TwiML answer (None for empty TwiML); the XML must parse."""
    assert resp.status_code == 200 and resp.mimetype == "text/xml"
    root = ET.fromstring(resp.get_data())
    assert root.tag == "Response"
    messages = root.findall("Message")
    assert len(messages) == len(root) <= 1
    return messages[0].text if messages else None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("STOP", REPLIES.stop_reply),
        ("stop texting me", REPLIES.stop_reply),  # a phrase opt-out is confirmed like STOP
        ("Start", REPLIES.start_reply),
        ("help", REPLIES.help_reply),
        ("info", REPLIES.help_reply),
        ("thanks, see you there", None),
    ],
)
def test_configured_replies_answer_their_keyword_in_escaped_twiml(
    container: bootstrap.Container, database_url: str, body: str, expected: str | None
) -> None:
    with settings(container, REPLIES):
        resp = signed_post("twilio_inbound", inbound_form("+15553340006", body))
    assert reply_text(resp) == expected
    if expected is not None:
        assert "<alerts>" not in resp.get_data(as_text=True)  # escaped, not markup


@pytest.mark.parametrize("body", ["STOP", "stop texting me", "START", "HELP", "hello"])
def test_without_replies_configured_every_answer_is_empty_twiml(
    container: bootstrap.Container, body: str
) -> None:
    resp = signed_post("twilio_inbound", inbound_form("+15553340007", body))
    assert reply_text(resp) is None
    assert resp.get_data(as_text=True) == '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def test_only_the_configured_reply_is_given(container: bootstrap.Container) -> None:
    only_help = replace(Settings(twilio_auth_token=TOKEN), help_reply="Acme help: acme.example")
    with settings(container, only_help):
        assert reply_text(signed_post("twilio_inbound", inbound_form("+15553340008", "HELP"))) == (
            "Acme help: acme.example"
        )
        assert reply_text(signed_post("twilio_inbound", inbound_form("+15553340008", "STOP"))) is None


def test_a_repeated_webhook_gets_the_same_reply_and_no_second_ledger_row(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15553340009")
    form = inbound_form("+15553340009", "STOP")
    with settings(container, REPLIES):
        first = signed_post("twilio_inbound", form)
        again = signed_post("twilio_inbound", form)
    assert reply_text(first) == reply_text(again) == REPLIES.stop_reply
    assert len(ledger(database_url, user)) == 1
    assert len(inbound_events(database_url)) == 1


# --- Twilio 21610 on a send ------------------------------------------------------------------------


def test_twilio_21610_on_send_opts_the_user_out_and_later_schedules_answer_409(
    container: bootstrap.Container, store: PostgresStore, sms_sink: SmsSink, database_url: str
) -> None:
    user = make_user(store, phone=UNSUBSCRIBED)
    first = scheduled(user, "first")
    second = scheduled(user, "second")  # planned after the cooldown: still queued
    resp = deliver(first)
    assert resp.status_code == 200
    assert (resp.get_json()["action"], resp.get_json()["reason"]) == ("failed", "opted_out")
    assert sms_sink.messages() == []
    failed = row(database_url, uuid.UUID(first))
    assert (failed["status"], failed["reason"], failed["attempts"]) == ("failed", "opted_out", 1)
    assert "21610" in failed["last_error"] and "unsubscribed" in failed["last_error"]
    cancelled = row(database_url, uuid.UUID(second))
    assert (cancelled["status"], cancelled["reason"]) == ("cancelled", "opted_out")
    assert opted_out_at(database_url, user) == T0
    [(event, source, raw, sid, at)] = ledger(database_url, user)
    assert (event, source, sid, at) == ("opt_out", "twilio_21610", None, T0)
    assert "21610" in raw and "unsubscribed recipient" in raw
    events = sql(
        database_url,
        "select event_type, payload->>'messageId', payload->>'reason' from events_outbox"
        " where topic = 'events' order by id",
    )
    assert events == [("message.failed", first, "opted_out"), ("message.cancelled", second, "opted_out")]
    refused = schedule(user)
    assert refused.status_code == 409 and refused.get_json() == {
        "success": False,
        "error": "opted_out",
        "message": refused.get_json()["message"],
        "userId": str(user),
    }
    # A retried task changes nothing and writes no second ledger row.
    assert deliver(first).get_json()["reason"] == "already_failed"
    assert len(ledger(database_url, user)) == 1


def test_21610_is_recognised_by_its_code_whatever_the_number(
    container: bootstrap.Container, store: PostgresStore, sms_sink: SmsSink, database_url: str
) -> None:
    user = make_user(store, phone="+15553340010")
    message = scheduled(user)
    sms_sink.add_fault(status=400, code=21610, message="Attempt to send to unsubscribed recipient")
    assert deliver(message).get_json()["reason"] == "opted_out"
    assert [r[:2] for r in ledger(database_url, user)] == [("opt_out", "twilio_21610")]
    # Another permanent refusal fails the message and leaves consent alone.
    other = make_user(store, phone="+15553340011")
    refused = scheduled(other)
    sms_sink.add_fault(status=400, code=21211)
    assert deliver(refused).get_json()["reason"] == "twilio_21211"
    assert opted_out_at(database_url, other) is None and ledger(database_url, other) == []


def test_a_user_opted_out_by_21610_opts_back_in_with_start(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone=UNSUBSCRIBED)
    deliver(scheduled(user))
    assert schedule(user).status_code == 409
    assert signed_post("twilio_inbound", inbound_form(UNSUBSCRIBED, "START")).status_code == 200
    assert schedule(user).status_code == 201
    assert [r[:2] for r in ledger(database_url, user)] == [("opt_out", "twilio_21610"), ("opt_in", "keyword")]


# --- the consent history, over HTTP ---------------------------------------------------------------


def test_consent_history_after_stop_start_and_21610_newest_first(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    clock = container.clock
    assert isinstance(clock, VirtualClock)
    user = make_user(store, phone=UNSUBSCRIBED)
    stop = inbound_form(UNSUBSCRIBED, "Stop!")
    assert signed_post("twilio_inbound", stop).status_code == 200
    clock.advance(timedelta(minutes=1))
    start = inbound_form(UNSUBSCRIBED, "START")
    assert signed_post("twilio_inbound", start).status_code == 200
    clock.advance(timedelta(minutes=1))
    assert deliver(scheduled(user)).get_json()["reason"] == "opted_out"  # Twilio still has them out

    resp = history(user)
    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["success"], body["userId"], body["optedOut"]) == (True, str(user), True)
    assert body["optedOutAt"] == "2025-06-02T15:02:00.000Z"
    events = body["events"]
    assert [(e["event"], e["source"], e["occurredAt"]) for e in events] == [
        ("opt_out", "twilio_21610", "2025-06-02T15:02:00.000Z"),
        ("opt_in", "keyword", "2025-06-02T15:01:00.000Z"),
        ("opt_out", "keyword", "2025-06-02T15:00:00.000Z"),
    ]
    assert [(e["rawText"], e["messageSid"]) for e in events[1:]] == [
        ("START", start["MessageSid"]),
        ("Stop!", stop["MessageSid"]),
    ]
    assert "21610" in events[0]["rawText"] and events[0]["messageSid"] is None
    assert all(e["recordedAt"] for e in events) and events[0]["id"] > events[1]["id"] > events[2]["id"]
    # ?limit= keeps the newest.
    assert [e["source"] for e in history(user, "?limit=1").get_json()["events"]] == ["twilio_21610"]


def test_a_user_with_no_consent_events_has_an_empty_history(
    container: bootstrap.Container, store: PostgresStore
) -> None:
    user = make_user(store)
    body = history(user).get_json()
    assert body == {"success": True, "userId": str(user), "optedOut": False, "optedOutAt": None, "events": []}


def test_events_of_one_instant_keep_their_order(container: bootstrap.Container, store: PostgresStore) -> None:
    user = make_user(store, phone="+15553340012")
    for body in ("STOP", "START", "HELP"):  # one virtual instant
        signed_post("twilio_inbound", inbound_form("+15553340012", body))
    events = history(user).get_json()["events"]
    assert [e["event"] for e in events] == ["help", "opt_in", "opt_out"]


@pytest.mark.parametrize(
    ("target", "query", "field"),
    [("not-a-uuid", "", "userId"), ("{user}", "?limit=0", "limit"), ("{user}", "?limit=1001", "limit"),
     ("{user}", "?limit=ten", "limit"), ("{user}", "?limit=" + "9" * 5000, "limit"),
     ("{user}", "?since=yesterday", "since")],
)  # fmt: skip
def test_a_bad_request_names_the_field(
    container: bootstrap.Container, store: PostgresStore, target: str, query: str, field: str
) -> None:
    resp = history(target.format(user=make_user(store)), query)
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["error"] == "invalid_request" and [e["field"] for e in body["errors"]] == [field]


def test_an_unknown_user_is_404(container: bootstrap.Container) -> None:
    resp = history(uuid.uuid4())
    assert resp.status_code == 404 and resp.get_json()["field"] == "userId"


IDENTITIES = replace(
    Settings(twilio_auth_token=TOKEN),
    caller_identity="header",
    agent_identities={
        "concierge@agents.test": frozenset({"concierge"}),
        "ops@example.test": frozenset({"*"}),
    },
)


def test_only_an_operator_may_read_consent_history(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15553340013")
    signed_post("twilio_inbound", inbound_form("+15553340013", "STOP"))
    with settings(container, IDENTITIES):
        operator = history(user, headers={IDENTITY_HEADER: "ops@example.test"})
        agent = history(user, headers={IDENTITY_HEADER: "concierge@agents.test"})
        # Refused before anything is read: an agent cannot probe which users exist.
        agent_unknown = history(uuid.uuid4(), headers={IDENTITY_HEADER: "concierge@agents.test"})
        stranger = history(user, headers={IDENTITY_HEADER: "nobody@example.test"})
        anonymous = history(user)
    assert operator.status_code == 200 and len(operator.get_json()["events"]) == 1
    for refused in (agent, agent_unknown, stranger):
        assert refused.status_code == 403
        body = refused.get_json()
        assert (body["error"], body["agentId"]) == ("forbidden_agent", "*")
        assert "events" not in body
    assert anonymous.status_code == 401 and anonymous.get_json()["error"] == "unauthenticated"


# --- atomicity: the ledger row and the change, or neither ------------------------------------------


@contextmanager
def failing(database_url: str, table: str) -> Iterator[None]:
    """Every insert into `table` raises, so a function that writes it fails after its earlier steps."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "create function test_refuse() returns trigger language plpgsql as"
            " $$ begin raise exception 'refused by the test'; end $$"
        )
        conn.execute(f"create trigger test_refuse before insert on {table} execute function test_refuse()")
        try:
            yield
        finally:
            conn.execute(f"drop trigger test_refuse on {table}")
            conn.execute("drop function test_refuse()")


def test_a_stop_whose_transaction_fails_leaves_no_ledger_row_and_no_change(
    store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15553340014")
    # The event for agents is the last thing mq_inbound writes, after the opt-out and its ledger row.
    with failing(database_url, "events_outbox"), pytest.raises(StoreError):
        store.inbound(
            "+15553340014", "STOP", "SMfail1", keyword="stop", source="keyword", num_media=0, now=T0
        )
    assert opted_out_at(database_url, user) is None
    assert ledger(database_url, user) == []
    assert sql(database_url, "select count(*) from messages") == [(0,)]
    # The same webhook again, once the database takes it, records it all.
    store.inbound("+15553340014", "STOP", "SMfail1", keyword="stop", source="keyword", num_media=0, now=T0)
    assert opted_out_at(database_url, user) == T0 and len(ledger(database_url, user)) == 1


def test_a_ledger_write_that_fails_undoes_the_opt_out(store: PostgresStore, database_url: str) -> None:
    user = make_user(store, phone="+15553340015")
    with failing(database_url, "consent_events"), pytest.raises(StoreError):
        store.inbound(
            "+15553340015", "STOP", "SMfail2", keyword="stop", source="keyword", num_media=0, now=T0
        )
    assert opted_out_at(database_url, user) is None
    assert sql(database_url, "select count(*) from messages") == [(0,)]


def test_a_21610_whose_ledger_write_fails_neither_fails_the_message_nor_opts_out(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15553340016")
    message = uuid.UUID(scheduled(user))
    claim = store.claim(
        message,
        0,
        T0,
        limits=container.policy.limits,
        daily_cap=10,
        day_start=T0 - timedelta(hours=15),
        day_end=T0 + timedelta(hours=9),
        lease_seconds=120,
    )
    assert claim.claimed
    with failing(database_url, "consent_events"), pytest.raises(StoreError):
        store.fail_opted_out(message, error="twilio 21610: unsubscribed", now=T0)
    assert row(database_url, message)["status"] == "sending"
    assert opted_out_at(database_url, user) is None
    assert sql(database_url, "select count(*) from events_outbox where event_type = 'message.failed'") == [
        (0,)
    ]
    assert store.fail_opted_out(message, error="twilio 21610: unsubscribed", now=T0) is True
    assert row(database_url, message)["status"] == "failed" and opted_out_at(database_url, user) == T0


def test_a_21610_for_a_message_no_longer_in_flight_changes_nothing(
    container: bootstrap.Container, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store, phone="+15553340017")
    message = scheduled(user)
    assert client("schedule_message").post(f"/messages/{message}/cancel").status_code == 200
    assert store.fail_opted_out(uuid.UUID(message), error="twilio 21610: unsubscribed", now=T0) is False
    assert row(database_url, uuid.UUID(message))["status"] == "cancelled"
    assert opted_out_at(database_url, user) is None and ledger(database_url, user) == []
    assert store.fail_opted_out(uuid.uuid4(), error="twilio 21610", now=T0) is False


def test_the_ledger_refuses_unknown_events_and_sources(store: PostgresStore, database_url: str) -> None:
    user = make_user(store)
    for event, source in (("opt_maybe", "keyword"), ("opt_out", "carrier_pigeon")):
        with pytest.raises(psycopg.errors.CheckViolation):
            sql(
                database_url,
                "insert into consent_events (user_id, occurred_at, event, source) values (%s, %s, %s, %s)",
                user,
                T0,
                event,
                source,
            )
