"""Every curl line of README.md, and every other command line it shows for the local stack, run as a
reader would paste it, against the local stack (the functions as real processes). Only the addresses
are the stack's: the README's placeholders ($SCHEDULE_URL, $USER_ID, $MESSAGE_ID, make dev's ports,
.dev/) are what a reader substitutes too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.dev.demo import pick_zone
from shared.dev.stack import LocalStack, Ports
from shared.store.postgres import PostgresStore

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

README = Path(__file__).resolve().parents[2] / "README.md"
MAKE_DEV_PORTS = Ports()  # the ports README's commands name (make dev's defaults)


def readme_curls() -> list[str]:
    """The curl commands: fenced bash blocks that start with curl, and inline `curl ...` spans."""
    text = README.read_text()
    found = [b.strip() for b in re.findall(r"```bash\n(curl .*?)```", text, flags=re.S)]
    found += re.findall(r"`(curl [^`]+)`", text.replace("\n", " "))
    return found


def readme_command_lines() -> list[str]:
    """The other local command lines: inline spans that run the venv's Python, or tail a file."""
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)  # fences would pair the wrong ticks
    spans = re.findall(r"`([^`]+)`", prose.replace("\n", " "))
    return [s for s in spans if s.startswith(("tail ", ".venv/bin/python ", "CLOUD_TASKS_EMULATOR_PYTHON="))]


def test_readme_has_the_commands_it_should() -> None:
    commands = readme_curls()
    assert any("$SCHEDULE_URL" in c for c in commands) and any(
        "--data-urlencode From=" in c for c in commands
    )
    assert any(re.search(r"/users/[0-9a-f-]{36}/messages\?", c) for c in commands)  # a user's queue
    local = "http://127.0.0.1:8081/"
    assert any(c.startswith(f"curl -s -X POST {local} ") for c in commands)
    assert f"curl -s {local}messages/$MESSAGE_ID" in commands
    assert any(c.startswith(f"curl -s -X POST {local}messages/$MESSAGE_ID/cancel") for c in commands)
    assert any("/_sink/outcomes" in c for c in commands) and any("/_sink/callbacks" in c for c in commands)
    lines = readme_command_lines()
    assert "tail -f .dev/events.jsonl" in lines
    assert ".venv/bin/python -m shared.dev.demo --reset" in lines
    assert any(line.startswith("CLOUD_TASKS_EMULATOR_PYTHON=") for line in lines)


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", ports=Ports.free(), database_url=database_url, quiet=True) as s:
        yield s


def test_every_curl_line_of_readme_works_against_the_local_stack(
    stack: LocalStack, database_url: str
) -> None:
    commands = readme_curls()
    store = PostgresStore(database_url)
    try:
        for user_id in set(re.findall(r'"userId": "([0-9a-f-]{36})"', "\n".join(commands))):
            store.upsert_user("+15550009000", "UTC", id=user_id)
    finally:
        store.close()
    # $USER_ID sleeps (quiet hours), so $MESSAGE_ID is still queued when README cancels it.
    night = pick_zone(datetime.now(UTC), {23, 0, 1, 2, 3, 4, 5})
    store = PostgresStore(database_url)
    try:
        user_id = store.upsert_user("+15550009001", night)["id"]
    finally:
        store.close()
    status, queued = stack.post_json(
        stack.schedule_url, {"userId": user_id, "agentId": "me", "messageData": {"content": "later"}}
    )
    assert status == 201 and queued["reason"] == "quiet_hours", queued
    env = {
        "SCHEDULE_URL": stack.schedule_url,
        "USER_ID": user_id,
        "MESSAGE_ID": queued["messageId"],
        "PATH": "/usr/bin:/bin",
    }
    for command in commands:
        for name in ("twilio_inbound", "twilio_status", "schedule_message", "health", "process_queue"):
            default = f"http://127.0.0.1:{MAKE_DEV_PORTS.of(name)}/"
            command = command.replace(default, stack.url_of(name).rstrip("/") + "/")
        command = command.replace(f"http://127.0.0.1:{MAKE_DEV_PORTS.sink}/", stack.sink_url + "/")
        proc = subprocess.run(
            ["bash", "-c", command + " -o /dev/stderr -w '%{http_code}'"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, (command, proc.stderr)
        assert proc.stdout.strip() in ("200", "201"), (command, proc.stdout, proc.stderr)
    _, doc = stack.get_json(f"{stack.schedule_url}messages/{queued['messageId']}")
    assert doc["status"] == "cancelled", doc

    if stack.pubsub_host is None:
        pytest.skip("no Google Cloud CLI: no Pub/Sub emulator, so no events to tail")
    stack.publish_sweep()  # what the minute's sweep does: the cancel's event goes out
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        e["attributes"].get("eventType") == "message.cancelled" for e in stack.events()
    ):
        time.sleep(0.2)
    [tail] = [c for c in readme_command_lines() if c.startswith("tail ")]
    followed = subprocess.run(
        ["timeout", "2", "bash", "-c", tail.replace(".dev/", f"{stack.workdir}/")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert followed.returncode == 124, followed.stderr  # still following when timeout ended it
    assert queued["messageId"] in followed.stdout, followed.stdout
    assert '"eventType": "message.cancelled"' in followed.stdout, followed.stdout


def _python_line(line: str) -> list[str]:
    """A README line `VAR=... .venv/bin/python args` as argv for this interpreter (the README's venv)."""
    words = line.split()
    start = words.index(".venv/bin/python")
    return [sys.executable, *words[start + 1 :]]


def test_the_demo_reset_line_of_readme_resets_the_demo_users(stack: LocalStack, database_url: str) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        [(user,)] = conn.execute("select mq_upsert_user('+15550000101', 'UTC')->>'id'").fetchall()
        conn.execute("select mq_record_consent(%s, 'opt_out', 'keyword', 'STOP', 'SM1', now())", (user,))
    [line] = [c for c in readme_command_lines() if "shared.dev.demo --reset" in c]
    proc = subprocess.run(
        _python_line(line),
        env=dict(os.environ, DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and f"reset 1 demo user(s): {user}" in proc.stdout, proc.stdout + proc.stderr
    with psycopg.connect(database_url) as conn:
        [(opted_out,)] = conn.execute("select opted_out_at from users where id = %s", (user,)).fetchall()
    assert opted_out is None


def test_the_stack_line_of_readme_starts_the_stack_and_ctrl_c_stops_it(
    tmp_path: Path, database_url: str
) -> None:
    [line] = [c for c in readme_command_lines() if c.startswith("CLOUD_TASKS_EMULATOR_PYTHON=")]
    emulator = os.environ.get("CLOUD_TASKS_EMULATOR_PYTHON")
    if emulator is None:
        pytest.skip("CLOUD_TASKS_EMULATOR_PYTHON is not set (make test sets it)")
    env = dict(os.environ, DATABASE_URL=database_url, CLOUD_TASKS_EMULATOR_PYTHON=emulator)
    # Only make dev's fixed ports and .dev/ are this test's own, so two runs never collide.
    argv = [*_python_line(line), "--free-ports", "--workdir", str(tmp_path / "dev")]
    proc = subprocess.Popen(argv, cwd=README.parent, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for text in proc.stdout:
            seen.append(text)
            if text.startswith("Everything is running"):
                break
        assert seen and seen[-1].startswith("Everything is running"), "".join(seen)
        assert not any(text.startswith("== Demo users") for text in seen)  # --no-demo
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Stopped every process the stack started." in rest, rest


def readme_watch_commands() -> list[str]:
    """The queue watch's command lines (fenced bash blocks that run shared.dev.watch)."""
    return re.findall(r"```bash\n(\.venv/bin/python -m shared\.dev\.watch[^\n]*)\n```", README.read_text())


def test_readmes_watch_command_prints_the_queue(database_url: str) -> None:
    """Run as a reader would, with DATABASE_URL set, the project's venv being this interpreter's."""
    commands = readme_watch_commands()
    assert commands
    store = PostgresStore(database_url)
    try:
        store.upsert_user("+15550009001", "America/Chicago")
    finally:
        store.close()
    root = README.parent
    for command in commands:
        argv = [sys.executable, *command.split()[1:]]
        env = {
            "DATABASE_URL": database_url,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(root),
            "COLUMNS": "120",
        }
        proc = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert "queue at" in proc.stdout and "nothing queued" in proc.stdout, proc.stdout
