"""Every curl line of README.md, run as a reader would paste it, against the local stack (the
functions as real processes). Only the addresses are the stack's: the README's placeholders
($SCHEDULE_URL, make dev's ports) are what a reader substitutes too."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def test_readme_has_the_curl_commands_it_should() -> None:
    commands = readme_curls()
    assert any("$SCHEDULE_URL" in c for c in commands) and any(
        "--data-urlencode From=" in c for c in commands
    )
    assert any(re.search(r"/users/[0-9a-f-]{36}/messages\?", c) for c in commands)  # a user's queue


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
    for command in commands:
        for name in ("twilio_inbound", "twilio_status", "schedule_message", "health", "process_queue"):
            default = f"http://127.0.0.1:{MAKE_DEV_PORTS.of(name)}/"
            command = command.replace(default, stack.url_of(name).rstrip("/") + "/")
        proc = subprocess.run(
            ["bash", "-c", command + " -o /dev/stderr -w '%{http_code}'"],
            env={"SCHEDULE_URL": stack.schedule_url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, (command, proc.stderr)
        assert proc.stdout.strip() in ("200", "201"), (command, proc.stdout, proc.stderr)


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
