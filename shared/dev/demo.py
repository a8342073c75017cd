"""The `make dev` demo: seeds users in several timezones, schedules a set of messages through the
schedule_message function and prints what happened and why, as a timeline.

It shows, whatever the time of day you run it: an immediate send, the 30 s cooldown spacing two
sends, an hourly-limit deferral, and a quiet-hours deferral to 08:00 in the user's own timezone.

The demo users (DEMO_PHONES) are kept between runs with the rest of the database; each run first
resets them (their messages and budgets deleted, a STOP undone by an operator opt-in), which is also
what `python -m shared.dev.demo --reset` does to a running or stopped stack's database (DATABASE_URL).
Nobody else's data is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import psycopg

if TYPE_CHECKING:
    from shared.dev.stack import LocalStack

ZONES = (
    "Pacific/Honolulu",
    "America/Los_Angeles",
    "America/New_York",
    "America/Sao_Paulo",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Pacific/Auckland",
)


# name -> number: Dana writes in the day, Noor sleeps, Sam gets the sequence
DEMO_PHONES = {"Dana": "+15550000101", "Noor": "+15550000202", "Sam": "+15550000303"}


def pick_zone(now: datetime, hours: set[int]) -> str:
    """The first zone whose local hour is in `hours` (the list spans every hour of the day)."""
    for name in ZONES:
        if now.astimezone(ZoneInfo(name)).hour in hours:
            return name
    raise RuntimeError(f"no zone in {ZONES} has a local hour in {sorted(hours)}")


def _local(ts: str | None, zone: str) -> str:
    if not ts:
        return "-"
    at = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    return at.strftime("%a %H:%M:%S %Z")


def _seed_user(database_url: str, phone: str, zone: str) -> uuid.UUID:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("select mq_upsert_user(%s, %s)", (phone, zone)).fetchone()
    assert row is not None
    return uuid.UUID(row[0]["id"])


def _make_active(database_url: str, user_id: uuid.UUID, now: datetime) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "select mq_record_inbound(%s, %s, %s, %s)",
            (user_id, "hey, any news?", "SM" + uuid.uuid4().hex, now),
        )


def _reset(database_url: str, user_ids: list[uuid.UUID]) -> None:
    """A second run starts the demo users from a clean slate (their old messages would defer the new).
    A demo user who replied STOP last time is opted back in, as an operator would, with its row in
    the consent ledger (source `operator`): the demo must run again, and a STOP is something to try."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for uid in user_ids:
            opted_out = conn.execute(
                "select opted_out_at is not null from users where id = %s", (uid,)
            ).fetchone()
            if opted_out and opted_out[0]:
                reset = "select mq_record_consent(%s, 'opt_in', 'operator', %s, null, now())"
                conn.execute(reset, (uid, "make dev: demo user reset"))
                print(f"  demo user {uid} had replied STOP: opted back in for the demo (ledger: operator)")
            conn.execute("update users set undeliverable_at = null where id = %s", (uid,))
            conn.execute("delete from message_queue where user_id = %s", (uid,))
            conn.execute("delete from user_message_budget where user_id = %s", (uid,))
            conn.execute("delete from messages where user_id = %s", (uid,))


def reset_demo_users(database_url: str) -> list[uuid.UUID]:
    """What each demo run does first, on its own: the demo users that exist start from a clean slate."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "select id from users where phone_number = any(%s) order by phone_number",
            (list(DEMO_PHONES.values()),),
        ).fetchall()
    ids = [row[0] for row in rows]
    _reset(database_url, ids)
    return ids


def reset_command(stack: LocalStack) -> str:
    """The command line that resets the demo users of this stack's database."""
    command = ".venv/bin/python -m shared.dev.demo --reset"
    if stack.embedded_database:
        # pgserver's socket needs no password: the printed URL works as it is (psql takes it too).
        return f"DATABASE_URL='{stack.printable_database_url}' {command}"
    return command  # your DATABASE_URL, from your environment as make dev read it


def run_demo(stack: LocalStack, *, wait_for_cooldown: bool = True) -> dict[str, Any]:
    assert stack.database_url
    now = datetime.now(UTC)
    day_zone = pick_zone(now, set(range(9, 20)))
    night_zone = pick_zone(now, {23, 0, 1, 2, 3, 4, 5})
    dana = _seed_user(stack.database_url, DEMO_PHONES["Dana"], day_zone)
    noor = _seed_user(stack.database_url, DEMO_PHONES["Noor"], night_zone)
    sam = _seed_user(stack.database_url, DEMO_PHONES["Sam"], day_zone)
    _reset(stack.database_url, [dana, noor, sam])
    _make_active(stack.database_url, dana, now)
    _make_active(stack.database_url, sam, now)

    print("\n== Demo users (kept between runs; reset at each start) ==")
    here = {"Dana": (dana, day_zone), "Noor": (noor, night_zone), "Sam": (sam, day_zone)}
    notes = {"Dana": "wrote to us just now", "Noor": "asleep", "Sam": "wrote to us just now"}
    for name, (uid, zone) in here.items():
        local = _local(now.isoformat(), zone)
        print(f"  {name:<5} {DEMO_PHONES[name]}  {uid}  {zone:<20} local {local}  ({notes[name]})")
    print(f"  reset them (messages, budgets, a STOP): {reset_command(stack)}")

    plan = [
        ("immediate send", dana, day_zone, "Welcome aboard! Your concierge is ready.", "high"),
        ("cooldown spacing", dana, day_zone, "Here are three restaurants near you.", "medium"),
        ("hourly-limit deferral", dana, day_zone, "Reminder: your table is at 8pm.", "medium"),
        ("quiet-hours deferral", noor, night_zone, "Good morning! Your intro was accepted.", "medium"),
    ]
    print("\n== Scheduling through schedule_message ==")
    results: list[dict[str, Any]] = []
    for label, user, zone, text, priority in plan:
        status, body = stack.post_json(
            stack.schedule_url,
            {
                "userId": str(user),
                "agentId": "demo_agent",
                "messageData": {"content": text},
                "priority": priority,
            },
        )
        if status not in (200, 201):
            raise RuntimeError(f"schedule_message answered {status}: {body}")
        results.append({"label": label, "zone": zone, "text": text, **body})
        print(
            f"  {label:<22} -> {status} scheduledFor {body['scheduledFor']} "
            f"({_local(body['scheduledFor'], zone)})  reason={body['reason']}: {body['explanation']}"
        )

    immediate, spaced = results[0], results[1]
    print("\n== Timeline at the SMS sink ==")
    deadline = time.monotonic() + (45 if wait_for_cooldown else 5)
    wanted = 2 if wait_for_cooldown else 1
    arrived: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        arrived = [m for m in stack.sink_messages() if m["to"] == "+15550000101"]
        if len(arrived) >= wanted:
            break
        time.sleep(0.25)
    for m in arrived:
        print(f"  {m['received_at']}  to {m['to']}  {m['body']!r}")
    if len(arrived) >= 2:
        t1 = datetime.fromisoformat(arrived[0]["received_at"].replace("Z", "+00:00"))
        t2 = datetime.fromisoformat(arrived[1]["received_at"].replace("Z", "+00:00"))
        cooldown = os.environ.get("COOLDOWN_SECONDS") or "30"
        print(f"  spacing between the two sends: {(t2 - t1).total_seconds():.1f} s (cooldown {cooldown} s)")

    print("\n== Status of each message (GET /messages/<id>) ==")
    for r in results:
        _, st = stack.get_json(f"{stack.schedule_url}messages/{r['messageId']}")
        print(
            f"  {r['label']:<22} {st['status']:<7} scheduledFor {_local(st['scheduledFor'], r['zone'])}"
            f"  sentAt {_local(st['sentAt'], r['zone'])}  reason={st['reason']}"
            f"  delivery={st.get('deliveryStatus') or '-'}"
        )

    extra = _show_the_rest(stack, sam, noor)

    print("\n== Try it yourself ==")
    print(
        f"  curl -s -X POST {stack.schedule_url} -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"userId": "{dana}", "agentId": "me", "messageData": {{"content": "hi"}}}}\'\n'
        f"  curl -s {stack.schedule_url}messages/{immediate['messageId']}\n"
        f"  curl -s -X POST {stack.schedule_url}messages/{results[2]['messageId']}/cancel "
        f"-H 'Content-Type: application/json' -d '{{\"reason\": \"changed my mind\"}}'\n"
        f"  curl -s {stack.sink_url}/_sink/messages"
    )
    if stack.pubsub_host is not None:
        print(f"  tail -f {stack.events_path}")
    return {
        "results": results,
        "arrived": arrived,
        "immediate": immediate,
        "spaced": spaced,
        "users": {name: uid for name, (uid, _) in here.items()},
        **extra,
    }


def _show_the_rest(stack: LocalStack, sam: uuid.UUID, noor: uuid.UUID) -> dict[str, Any]:
    """A sequence, a structured message rendered without a model key, supersede by topic, cancel."""
    print("\n== Sequences, rendering, supersede, cancel ==")
    _, seq = stack.post_json(
        stack.schedule_url,
        {
            "userId": str(sam),
            "agentId": "demo_agent",
            "priority": "high",
            "sequence": [
                {"content": "Great news!"},
                {"content": "Sam accepted your intro.", "delaySeconds": 1},
                {"type": "intro_next_step", "style": "supportive", "suggestion": "a call on Thursday"},
            ],
        },
    )
    print(
        f"  sequence of {seq.get('parts')} parts    -> scheduledFor {seq.get('scheduledFor')}"
        f"  reason={seq.get('reason')}"
    )
    first = {"userId": str(noor), "agentId": "demo_agent", "topicKey": "daily-digest"}
    _, old = stack.post_json(stack.schedule_url, first | {"messageData": {"content": "Digest v1"}})
    _, new = stack.post_json(stack.schedule_url, first | {"messageData": {"content": "Digest v2"}})
    print(f"  same topic again        -> superseded {new.get('superseded')} (was {old.get('messageId')})")
    status, cancelled = stack.post_json(
        f"{stack.schedule_url}messages/{new['messageId']}/cancel", {"agentId": "demo_agent", "reason": "demo"}
    )
    print(f"  cancel the new one      -> {status} status={cancelled.get('status')}")
    deadline = time.monotonic() + 10
    parts: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(parts) < 3:
        parts = [m for m in stack.sink_messages() if m["to"] == "+15550000303"]
        time.sleep(0.25)
    for m in parts:
        print(f"  {m['received_at']}  to {m['to']}  {m['body']!r}")
    return {"sequence": seq, "superseded": new.get("superseded"), "cancelled": cancelled, "parts": parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.dev.demo", description="The make dev demo's data."
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="reset the demo users (messages, budgets, a STOP) in DATABASE_URL",
    )
    args = parser.parse_args(argv)
    database_url = os.environ.get("DATABASE_URL")
    if not args.reset:
        parser.print_help()
        return 2
    if not database_url:
        print(
            "DATABASE_URL is not set: the demo prints the line to use (make dev's database)", file=sys.stderr
        )
        return 2
    ids = reset_demo_users(database_url)
    print(f"reset {len(ids)} demo user(s): {', '.join(str(i) for i in ids) or 'none yet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
