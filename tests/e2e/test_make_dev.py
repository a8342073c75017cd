"""`make dev`'s program, run as a user runs it: the stack comes up, the demo shows each rule with
its reason, and stopping leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

REPO = Path(__file__).resolve().parents[2]


def test_the_dev_stack_runs_the_demo_and_stops_cleanly(tmp_path: Path, database_url: str) -> None:
    env = dict(os.environ, DATABASE_URL=database_url, COOLDOWN_SECONDS="3")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.dev.stack",
            "--exit-after-demo",
            "--free-ports",
            "--workdir",
            str(tmp_path),
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
    assert "Stopped every process the stack started." in out
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
