"""Chaos, end to end: the functions as real functions-framework processes, the Cloud Tasks emulator
and the SMS sink, loopback only. A few dozen messages for several users are delivered while the
deliver_message process is SIGKILLed, once exactly between Twilio's accept and the record (the sink
accepts the message, then holds its answer), once more while whatever else is in flight; each time
it is started again. Then the system is driven to quiescence (Cloud Tasks retries, process_queue
sweeps) and judged from the database and the sink's record only: every accepted message was sent
exactly once (the sink has it once, with the sid its row recorded) or is in a final state with a
reason; nothing was sent twice; no row is left `sending` or `queued`.

The one stand-in for waiting: a claim's lease is at least the longest delivery
(shared.domain.longest_delivery_seconds, 70 s even with TWILIO_TIMEOUT_SECONDS=1), longer than this
module may take. A killed process's claims are dead the instant it dies, so the test expires their
leases (only the claims last written before the kill) instead of waiting them out; from there the
production code alone decides what was sent."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.dev.stack import LocalStack, Ports
from shared.store.postgres import PostgresStore
from tests.support.factories import make_active, make_user, sql

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

USERS = 6
PER_USER = 5
HELD_ANSWER_SECONDS = 6  # the sink's late answer; under TWILIO_TIMEOUT_SECONDS, so the sender waits
FINAL = {"sent", "failed", "cancelled", "expired", "superseded"}
ENV = {
    "COOLDOWN_SECONDS": "1",
    "HOURLY_LIMIT": "100",
    "DAILY_LIMIT": "100",
    "COMPLIANCE_PROFILE": "none",
    "TWILIO_TIMEOUT_SECONDS": "10",
    "RECONCILE_AFTER_SECONDS": "1",
    "SWEEP_GRACE_SECONDS": "1",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[LocalStack]:
    s = LocalStack(
        tmp_path / "stack",
        ports=Ports.free(),
        database_url=database_url,
        extra_env=ENV,
        quiet=True,
        use_pubsub=False,
        sweep_interval=0,  # the test sweeps
    )
    with s:
        yield s


def test_deliveries_survive_sigkilled_senders_each_message_sent_once(
    stack: LocalStack, database_url: str
) -> None:
    started = time.monotonic()
    store = PostgresStore(database_url)
    try:
        phones = [f"+1555900{i:04d}" for i in range(USERS)]
        users = [make_user(store, "Pacific/Kiritimati", phone=p) for p in phones]
        for user in users:
            make_active(store, user, datetime.now(UTC))
    finally:
        store.close()
    victim = phones[0]
    # The first send to the victim: accepted at once, answered HELD_ANSWER_SECONDS later.
    code, _ = stack.post_json(
        f"{stack.sink_url}/_sink/faults",
        {"to": victim, "accept": True, "delay_seconds": HELD_ANSWER_SECONDS},
    )
    assert code == 201

    accepted: dict[str, tuple[str, str]] = {}  # messageId -> (phone, content)
    for j in range(PER_USER):
        for user, phone in zip(users, phones, strict=True):
            content = f"chaos {phone[-4:]} #{j}"
            body = {"userId": str(user), "agentId": "chaos", "messageData": {"content": content}}
            code, answer = stack.post_json(stack.schedule_url, body)
            assert code == 201, answer
            accepted[answer["messageId"]] = (phone, content)

    # (a) Twilio has accepted the victim's message and the sender waits for the answer: kill it.
    _wait_until(lambda: any(m["to"] == victim for m in stack.sink_messages()), 15, "the victim's send")
    _kill_deliver(stack, database_url)
    # Once more, while whatever else is in flight (claims, sends, records) goes down with it.
    _wait_until(lambda: len(stack.sink_messages()) >= USERS + 3, 15, "more sends after the restart")
    _kill_deliver(stack, database_url)

    _drive_to_quiescence(stack, database_url, set(accepted), timeout=45)

    rows = {
        str(r[0]): r[1:]
        for r in sql(
            database_url,
            "select q.id, q.status, q.reason, q.twilio_message_sid, q.final_message, u.phone_number"
            " from message_queue q join users u on u.id = q.user_id",
        )
    }
    assert set(rows) == set(accepted)
    sink = stack.sink_messages()
    by_sid = {m["sid"]: m for m in sink}
    assert len(by_sid) == len(sink)
    # Nothing sent twice.
    twice = [k for k, n in Counter((m["to"], m["body"]) for m in sink).items() if n > 1]
    assert not twice, twice
    stuck = {i: r for i, r in rows.items() if r[0] not in FINAL}
    assert not stuck, stuck
    sent_sids = set()
    for message_id, (status, reason, sid, final, phone) in rows.items():
        to, content = accepted[message_id]
        assert phone == to
        if status == "sent":
            # Sent exactly once: the sink has it, under the sid the row recorded.
            assert sid in by_sid, (message_id, sid)
            assert (by_sid[sid]["to"], by_sid[sid]["body"]) == (to, content) == (to, final)
            sent_sids.add(sid)
        else:
            assert reason, (message_id, status)
            assert not any(m["to"] == to and m["body"] == content for m in sink), message_id
    # Everything the sink accepted belongs to one sent row.
    assert sent_sids == set(by_sid)
    # The message killed between Twilio's accept and the record was recorded, not resent.
    [victim_first] = [i for i, (p, c) in accepted.items() if p == victim and c.endswith("#0")]
    assert rows[victim_first][0] == "sent"
    assert time.monotonic() - started < 75


def _kill_deliver(stack: LocalStack, database_url: str) -> None:
    stack.kill("deliver_message")
    killed_at = datetime.now(UTC)
    # Its claims died with it: expire their leases now rather than wait them out (see the docstring).
    sql(
        database_url,
        "update message_queue set lease_expires_at = now()"
        " where status = 'sending' and updated_at <= %s and lease_expires_at > now()",
        killed_at,
    )
    stack.restart("deliver_message")


def _drive_to_quiescence(stack: LocalStack, database_url: str, ids: set[str], timeout: float) -> None:
    """Sweep until every accepted row is final and the sink has been quiet for a moment."""
    deadline = time.monotonic() + timeout
    last: tuple[Any, ...] = ()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        code, report = stack.post_json(stack.url_of("process_queue"), {})
        assert code == 200, report
        open_rows = sql(
            database_url, "select id, status from message_queue where status <> all(%s)", sorted(FINAL)
        )
        state = (tuple(sorted(open_rows)), len(stack.sink_messages()))
        if state != last:
            last, stable_since = state, time.monotonic()
        elif not open_rows and time.monotonic() - stable_since >= 1.5:
            return
        time.sleep(0.5)
    raise AssertionError(f"not quiescent within {timeout} s: {last}")


def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout} s")
