"""`python -m bench`: measure, write bench/results.md, print it. Always exits 0 (targets are reported,
not enforced); a benchmark that crashes is reported as an error row instead of a figure."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"


@dataclass(frozen=True)
class Figure:
    name: str
    value: float | None
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    def row(self) -> str:
        value = "error" if self.value is None else f"{_fmt(self.value)} {self.unit}".strip()
        if self.target is None:
            target, met = "—", "—"
        else:
            op = "≥" if self.higher_is_better else "≤"
            target = f"{op} {_fmt(self.target)} {self.unit}".strip()
            if self.value is None:
                met = "no"
            else:
                ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
                met = "yes" if ok else "**no**"
        name = f"{self.name} ({self.note})" if self.note else self.name
        return f"| {name} | {value} | {target} | {met} |"


def _fmt(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(figures: list[Figure]) -> str:
    lines = ["| figure | value | target | met? |", "|---|---|---|---|"]
    lines += [f.row() for f in figures]
    return "\n".join(lines)


def _guarded(name: str, fn: Callable[[], list[Figure]]) -> list[Figure]:
    try:
        return fn()
    except Exception:
        traceback.print_exc()
        return [Figure(name, None, "", note="benchmark crashed, see stderr")]


def main() -> int:
    logging.disable(logging.INFO)  # the use cases log every message; logging is not what is measured
    from bench import db, policy

    started = time.perf_counter()
    figures = _guarded("policy", policy.run)
    with tempfile.TemporaryDirectory(prefix="mq-bench-") as tmp:
        figures += _guarded("database", lambda: db.run(Path(tmp)))
    elapsed = time.perf_counter() - started

    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"`make bench` on {sys.platform}, Python {sys.version.split()[0]}; "
            f"embedded PostgreSQL on the same machine; took {elapsed:.0f} s. "
            "Latency and throughput are in-process (functions-framework test client), so they exclude "
            "the network and Cloud Functions' own overhead. Targets are reported, not enforced.",
            "",
            table(figures),
            "",
        ]
    )
    RESULTS.write_text(text)
    print(text)
    return 0
