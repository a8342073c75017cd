"""`python -m bench`: measure, write bench/results.md, print it. Always exits 0 (targets are reported,
not enforced); a benchmark that crashes is reported as an error row instead of a figure."""

from __future__ import annotations

import functools
import logging
import os
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


@dataclass(frozen=True)
class Section:
    title: str
    about: str
    figures: list[Figure]
    seconds: float

    def text(self) -> str:
        return "\n".join([f"## {self.title} ({self.seconds:.0f} s)", "", self.about, "", table(self.figures)])


def _section(title: str, about: str, fn: Callable[[], list[Figure]]) -> Section:
    started = time.perf_counter()
    figures = _guarded(title, fn)
    return Section(title, about, figures, time.perf_counter() - started)


HISTORY = "## History"


def _history() -> str:
    """The hand-kept "## History" part of the previous results.md (before/after records): kept."""
    try:
        old = RESULTS.read_text()
    except FileNotFoundError:
        return ""
    at = old.find("\n" + HISTORY)
    return old[at + 1 :].rstrip() + "\n" if at >= 0 else ""


# Sections that need the database, in the order they run: (title, module name in bench/). Each
# module has ABOUT (the paragraph under its title) and run(pg) -> list[Figure].
DATABASE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("Machine", "machine"),
    ("Schedule and deliver", "db"),
    ("Sweep", "sweep"),
    ("Lateness", "lateness"),
    ("Claim path", "claims"),
    ("End-to-end lateness and fairness", "e2e"),
    ("Cold start and memory", "coldstart"),
)


def _wanted(argv: list[str]) -> set[str] | None:
    """`--only a,b` (module names, e.g. `--only db,claims`): run those sections alone, to work on one;
    results.md is then not rewritten, since it would hold a partial run."""
    if "--only" not in argv:
        return None
    at = argv.index("--only")
    if at + 1 >= len(argv):
        raise SystemExit("--only needs a comma-separated list of section modules")
    return {name.strip() for name in argv[at + 1].split(",") if name.strip()}


def main(argv: list[str] | None = None) -> int:
    import importlib

    logging.disable(logging.INFO)  # the use cases log every message; logging is not what is measured
    from bench import policy
    from bench.support import Postgres

    wanted = _wanted(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    sections = (
        []
        if wanted is not None and "policy" not in wanted
        else [_section("Policy", policy.ABOUT, policy.run)]
    )
    database = [
        (title, importlib.import_module(f"bench.{name}"))
        for title, name in DATABASE_SECTIONS
        if wanted is None or name in wanted
    ]
    with tempfile.TemporaryDirectory(prefix="mq-bench-") as tmp:
        pg: Postgres | None = None
        try:
            pg = Postgres(Path(tmp) / "pg")
        except Exception:
            traceback.print_exc()
        for title, module in database:
            if pg is None:
                sections.append(
                    Section(title, module.ABOUT, [Figure(title, None, "", note="no PostgreSQL")], 0)
                )
                continue
            run: Callable[[Postgres], list[Figure]] = module.run
            sections.append(_section(title, module.ABOUT, functools.partial(run, pg)))
        if pg is not None:
            pg.stop()
    elapsed = time.perf_counter() - started
    # The yardsticks first: they say how fast the machine was, which every figure below depends on
    # (the policy runs first only because it needs no database).
    sections.sort(key=lambda s: s.title != "Machine")

    history = _history()
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"`make bench` on {sys.platform}, Python {sys.version.split()[0]}, {os.cpu_count()} cores; "
            f"embedded PostgreSQL on the same machine; took {elapsed:.0f} s. "
            "Latency and throughput are in-process (functions-framework test client), so they exclude "
            "the network and Cloud Functions' own overhead. Cloud Tasks is faked in-process; Twilio too, "
            "except where a row says the local SMS sink (the real twilio client over loopback). "
            "Targets are reported, not enforced.",
            "",
            *(s.text() + "\n" for s in sections),
            *([history] if history and wanted is None else []),
        ]
    )
    if wanted is None:
        RESULTS.write_text(text)
    print(text)
    return 0
