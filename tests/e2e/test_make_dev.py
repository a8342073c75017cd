"""`make dev`'s program, run as a user runs it: the stack comes up, the demo shows each rule with
its reason, and stopping leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

REPO = Path(__file__).resolve().parents[2]


def test_the_dev_stack_runs_the_demo_and_stops_cleanly(tmp_path: Path, database_url: str) -> None:
    """Through `make dev` itself (README's first command), with the flags README documents. `-o`
    takes the install stamps as done: what make dev installs is tests/unit/test_install_sets.py's,
    and reinstalling into the venv the other tests run from would pull it from under them."""
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.fail("no .venv: make test creates it, and make dev runs from it")
    env = dict(os.environ, DATABASE_URL=database_url, COOLDOWN_SECONDS="3")
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            ".venv/.local",
            "-o",
            ".venv-emulator/.installed",
            "dev",
            f"DEV_ARGS=--exit-after-demo --free-ports --workdir {tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "immediate send         -> 201" in out and "reason=ok" in out
    assert "cooldown spacing       -> 201" in out and "reason=cooldown" in out
    assert "reason=hourly_limit" in out
    assert "reason=quiet_hours" in out and "08:00:00" in out
    assert "spacing between the two sends" in out
    assert "sequence of 3 parts" in out and "'Sam accepted your intro.'" in out
    assert "superseded ['" in out and "status=cancelled" in out
    assert "curl -s -X POST" in out
    users = re.findall(r"^  (Dana|Noor|Sam)\s+\+1555\d+\s+([0-9a-f-]{36})\s", out, flags=re.M)
    assert [name for name, _ in users] == ["Dana", "Noor", "Sam"], out
    assert "reset them (messages, budgets, a STOP): .venv/bin/python -m shared.dev.demo --reset" in out
    assert "Stopped every process the stack started." in out
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"


def _messages_of(database_url: str, user: str) -> list[str]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        query = "select coalesce(twilio_message_sid, '') from messages where user_id = %s"
        rows = conn.execute(query, (user,))
        return [sid for (sid,) in rows.fetchall()]


def test_a_demo_user_who_replied_stop_does_not_break_the_next_run(tmp_path: Path, database_url: str) -> None:
    """Trying STOP on a demo user is what a newcomer does; the next `make dev` must still come up:
    the demo opts its users back in, as an operator would, and the consent ledger says so. As README
    says, the database is kept between runs: the demo wipes its own users' messages, nobody else's;
    and the reset command it prints does the same while the stack is down."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        [(user,)] = conn.execute("select mq_upsert_user('+15550000202', 'UTC')->>'id'").fetchall()
        conn.execute("select mq_record_consent(%s, 'opt_out', 'keyword', 'STOP', 'SM1', now())", (user,))
        conn.execute("select mq_record_inbound(%s, 'old demo chat', 'SMdemo-old', now())", (user,))
        [(other,)] = conn.execute("select mq_upsert_user('+15550000999', 'UTC')->>'id'").fetchall()
        conn.execute("select mq_record_inbound(%s, 'mine', 'SMnot-demo', now())", (other,))
    env = dict(os.environ, DATABASE_URL=database_url, COOLDOWN_SECONDS="3")
    command = ["-m", "shared.dev.stack", "--exit-after-demo", "--free-ports", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "had replied STOP: opted back in" in proc.stdout and "reason=quiet_hours" in proc.stdout
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "select event, source from consent_events where user_id = %s order by id", (user,)
        ).fetchall()
    assert events == [("opt_out", "keyword"), ("opt_in", "operator")]
    assert "SMdemo-old" not in _messages_of(database_url, user)
    assert _messages_of(database_url, other) == ["SMnot-demo"]

    reset = re.search(r"reset them \(messages, budgets, a STOP\): \.venv/bin/python (.+)$", proc.stdout, re.M)
    assert reset is not None, proc.stdout
    again = subprocess.run(
        [sys.executable, *reset[1].split()], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "reset 3 demo user(s)" in again.stdout, again.stdout + again.stderr
    assert _messages_of(database_url, user) == [] and _messages_of(database_url, other) == ["SMnot-demo"]
