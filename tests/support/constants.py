"""Constants the integration tests share: the instant their virtual clocks start at, the policy the
use cases run under unless a module needs another, and where the functions and recorded bodies are."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from shared import service
from shared.domain import Limits

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "functions" / "main.py")  # functions-framework's --source
SCHEDULE_DATA = ROOT / "tests" / "data" / "schedule_message"  # recorded schedule_message bodies

# Monday 2 June 2025, 15:00 UTC: 11:00 in New York, 17:00 in Berlin, 00:00 Tuesday in Tokyo.
T0 = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)
POLICY = service.Policy(limits=Limits(), max_attempts=3)
