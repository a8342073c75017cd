"""The operators' queue watch (`python -m shared.dev.watch --once`) by its output on a database
seeded through the real use cases: schedule, deliver through the twilio client to the SMS sink,
Twilio's status callbacks; time virtual."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shared import service
from shared.dev import watch
from shared.domain import Limits
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import T0
from tests.support.factories import make_user, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock

POLICY = service.Policy(limits=Limits(), max_attempts=3)


def schedule(store: PostgresStore, tasks: RecordingTaskQueue, user: uuid.UUID, **fields: Any) -> uuid.UUID:
    body = {"userId": str(user), "agentId": "concierge_agent", "messageData": {"content": "hi"}} | fields
    body = {k: v for k, v in body.items() if v is not None}  # messageData=None: a sequence instead
    return service.schedule(body, store=store, tasks=tasks, config=POLICY, now=T0).message.id


def send(store: PostgresStore, tasks: RecordingTaskQueue, sender: TwilioSender, m: uuid.UUID) -> str:
    """Delivered at its planned time, as its task would."""
    planned = store.get_message(m)
    assert planned is not None and planned.scheduled_for is not None
    outcome = service.deliver(
        {"messageId": str(m), "generation": planned.generation},
        store=store,
        tasks=tasks,
        sms=sender,
        config=POLICY,
        clock=VirtualClock(planned.scheduled_for),
    )
    assert outcome.action == "sent" and outcome.sid, outcome
    return outcome.sid


def receipt(store: PostgresStore, sid: str, status: str, code: str | None = None) -> None:
    form = {"MessageSid": sid, "MessageStatus": status} | ({"ErrorCode": code} if code else {})
    service.status_callback(form, store=store, now=T0 + timedelta(seconds=5))


def run(database_url: str, *args: str, seconds: int = 10) -> str:
    console = Console(record=True, width=200, color_system=None)
    now = T0 + timedelta(seconds=seconds)
    assert (
        watch.main(["--once", "--database-url", database_url, *args], console=console, clock=lambda: now) == 0
    )
    return console.export_text()


def line(output: str, *words: str) -> str:
    [found] = [row for row in output.splitlines() if all(w in row for w in words)]
    return found


COLUMNS = ("state", "priority", "agent", "topic", "planned", "sent", "why", "text")


def cells(output: str, text: str) -> dict[str, str]:
    """The table row of the message whose text is `text`, by column."""
    row = line(output, text).strip().strip("│")
    return dict(zip(COLUMNS, (c.strip() for c in row.split("│")), strict=True))


@pytest.fixture
def seeded(store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender) -> dict[str, Any]:
    chicago = make_user(store, "America/Chicago", phone="+15550000001")  # 10:00 CDT at T0
    tokyo = make_user(store, "Asia/Tokyo", phone="+15550000002")  # 00:00 JST: quiet hours
    london = make_user(store, "Europe/London", phone="+15550000003")  # 16:00 BST
    due = schedule(
        store, tasks, chicago, priority="high", topicKey="intro", messageData={"content": "Meet Sam"}
    )
    schedule(store, tasks, chicago, agentId="coach_agent", messageData={"content": "Log your run"})
    schedule(store, tasks, tokyo, priority="low", messageData={"content": "Good morning"})
    delivered = schedule(store, tasks, london, messageData={"content": "Table at 8"})
    receipt(store, send(store, tasks, twilio_sender, delivered), "delivered")
    lost = schedule(store, tasks, london, priority="urgent", messageData={"content": "Gate changed"})
    receipt(store, send(store, tasks, twilio_sender, lost), "undelivered", "30006")
    return {"chicago": chicago, "due": due}


def test_once_shows_each_users_queue_in_their_local_time_with_states_and_reasons(
    database_url: str, seeded: dict[str, Any]
) -> None:
    out = run(database_url)

    assert "queue at 2025-06-02 15:00:10 UTC: 5 messages" in out
    assert "+15550000001" in line(out, "America/Chicago", "local 10:00:10 CDT")
    assert cells(out, "Meet Sam") == {
        "state": "due",
        "priority": "high",
        "agent": "concierge_agent",
        "topic": "intro",
        "planned": "10:00:00 CDT (10s ago)",
        "sent": "",
        "why": "",
        "text": "Meet Sam",
    }
    cooldown = cells(out, "Log your run")
    assert (cooldown["state"], cooldown["agent"], cooldown["why"]) == ("deferred", "coach_agent", "cooldown")
    assert cooldown["planned"] == "10:00:30 CDT (in 20s)"
    quiet = cells(out, "Good morning")
    assert (quiet["state"], quiet["priority"], quiet["why"]) == ("deferred", "low", "quiet_hours")
    assert quiet["planned"] == "08:00:00 JST (in 7h)"  # Tokyo's today is already June 3
    delivered = cells(out, "Table at 8")
    assert (delivered["state"], delivered["sent"]) == ("delivered", "16:00:00 BST")
    assert delivered["why"] == "delivered 16:00:05 BST"
    lost = cells(out, "Gate changed")
    assert (lost["state"], lost["priority"], lost["why"]) == ("undelivered", "urgent", "error 30006")
    assert "1 due, 1 deferred" in out and "1 delivered, 1 undelivered" in out
    # Users in phone order: Chicago, Tokyo, London.
    assert out.index("America/Chicago") < out.index("Asia/Tokyo") < out.index("Europe/London")


def test_a_deferral_at_delivery_shows_the_last_decision(
    database_url: str, store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender
) -> None:
    user = make_user(store, "America/Chicago")
    schedule(store, tasks, user, messageData={"content": "First"})
    second = schedule(store, tasks, user, messageData={"content": "Second"})
    early = service.deliver(  # its task woke before its planned time
        {"messageId": str(second), "generation": 0},
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=POLICY,
        clock=VirtualClock(T0 + timedelta(seconds=5)),
    )
    assert early.action == "deferred"
    why = cells(run(database_url), "Second")["why"]
    assert why == "early_task; last deferred 10:00:05 CDT"


def test_a_sent_message_leaves_the_watch_after_the_window_and_one_user_can_be_picked(
    database_url: str, seeded: dict[str, Any]
) -> None:
    later = run(database_url, "--since-hours", "1", seconds=7200)
    assert "Table at 8" not in later and "Gate changed" not in later
    assert cells(later, "Meet Sam")["planned"] == "10:00:00 CDT (2h ago)"

    mine = run(database_url, "--user", str(seeded["chicago"]))
    assert "Meet Sam" in mine and "Good morning" not in mine and "2 messages" in mine


def test_the_watch_session_is_read_only(database_url: str, seeded: dict[str, Any]) -> None:
    with watch.connect(database_url) as conn, pytest.raises(Exception, match="read-only"):
        conn.execute("delete from message_queue")


def test_without_a_database_url_it_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    console = Console(record=True, width=120)
    assert watch.main(["--once"], console=console) == 2
    assert "DATABASE_URL" in console.export_text()


def test_live_it_refreshes_until_ctrl_c(database_url: str, seeded: dict[str, Any]) -> None:
    """As an operator runs it: a process that keeps the view up and stops cleanly on Ctrl-C."""
    root = Path(__file__).resolve().parents[2]
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "shared.dev.watch", "--interval", "0.2", "--width", "200"]
    proc = subprocess.Popen(
        argv, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(3)  # the interpreter starts, connects and refreshes a few times
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # The real clock: the seeded queue is a year and more overdue, what went out long past the window.
    assert "3 messages" in out and "Meet Sam" in out and "Table at 8" not in out and "Traceback" not in err


def test_a_claimed_message_shows_as_sending_and_a_sequence_its_parts(
    database_url: str, store: PostgresStore, tasks: RecordingTaskQueue
) -> None:
    user = make_user(store, "America/Chicago")
    claimed = schedule(store, tasks, user, messageData={"content": "Going out now"})
    parts = [{"content": "Great news!"}, {"content": "Sam accepted.", "delaySeconds": 2}]
    schedule(store, tasks, user, messageData=None, sequence=parts, topicKey="intro")
    sql(  # as a deliver's claim leaves it, mid-send
        database_url,
        "update message_queue set status = 'sending', claim_token = gen_random_uuid(),"
        " lease_expires_at = %s, slot_at = scheduled_for where id = %s",
        T0 + timedelta(minutes=2),
        claimed,
    )
    out = run(database_url)
    sending = cells(out, "Going out now")
    assert (sending["state"], sending["why"]) == ("sending", "claimed until 10:02:00 CDT")
    sequence = line(out, "[2 parts]")
    assert "deferred" in sequence and "intro" in sequence
