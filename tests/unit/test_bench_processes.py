"""bench/db.py's account of the 8-process gain (no timings here: the bench itself is `make bench`)."""

from __future__ import annotations

import os
import re
import time

import pytest

from bench import db
from bench.support import machine_busy_seconds


def _run(n: int, wall: float, busy: float | None, client_cpu: float) -> db.ProcessRun:
    return db.ProcessRun([0.001] * n, wall, busy, client_cpu)


def test_the_gain_is_the_busy_cores_ratio_times_the_per_request_cost_ratio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 1 process: 500 requests in 1 s keeping 0.8 cores busy (1.6 ms of machine CPU a request);
    # 8: 800 in 1 s keeping 2 busy (2.5 ms a request). Gain 1.6 = (2 / 0.8) * (1.6 / 2.5).
    one, many = _run(500, 1.0, 0.8, 0.5), _run(800, 1.0, 2.0, 1.2)
    assert many.rate / one.rate == pytest.approx((2.0 / 0.8) * (1.6 / 2.5))
    assert one.machine_ms == pytest.approx(1.6)
    assert many.client_ms == pytest.approx(1.5)
    note = db._cores_note([one], [many])
    assert "keeps 0.80 of the 2 cores busy" in note
    assert "more than 2.50×" in note  # 2 cores / 0.8
    assert re.search(r"2\.50 ms of CPU against 1\.60 with one \(0\.64×", note)
    assert "own 1.50 against 1.00 ms" in note and "the rest 1.00 against 0.60 ms" in note


def test_without_proc_stat_the_note_says_nothing_rather_than_guess() -> None:
    assert db._cores_note([_run(10, 1.0, None, 0.1)], [_run(10, 1.0, 1.0, 0.1)]) == ""


def test_the_machine_busy_reading_counts_this_process_s_work() -> None:
    before = machine_busy_seconds()
    if before is None:
        pytest.skip("no /proc/stat on this system: the bench's note is left out there too")
    cpu = time.process_time()
    while time.process_time() - cpu < 0.2:
        pass
    after = machine_busy_seconds()
    assert after is not None
    # The whole machine was busy at least as long as this process (clock ticks are 10 ms).
    assert after - before >= 0.2 - 0.02
