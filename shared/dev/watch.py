"""A live view of the queue for operators: `python -m shared.dev.watch`.

Per user, in the user's own local time: what is due, what is deferred and why (the row's reason
and the last decision agent_actions_log recorded), what is being sent, and what went out with what
Twilio said of it (delivered, undelivered with its error code). `--once` prints one snapshot.

Read-only SQL straight against the database (a dev tool: no API serves a whole queue), in a
read-only session, so pointing it at a live database cannot change anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.rows import dict_row
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

# Queued and sending rows always; what went out (or failed) within the window.
SNAPSHOT_SQL = """
select q.id, q.user_id, u.phone_number, u.timezone, q.agent_id, q.priority, q.status, q.reason,
       q.topic_key, q.scheduled_for, q.sent_at, q.last_error, q.attempts, q.part_count,
       q.lease_expires_at,
       coalesce(q.final_message, q.message_data->>'content', q.message_data->>'type', '') as text,
       m.status as delivery_status, m.error_code as delivery_error_code, m.delivered_at,
       a.action_type as last_action, a.output_data->>'reason' as last_action_reason,
       a.created_at as last_action_at
from message_queue q
join users u on u.id = q.user_id
left join messages m on m.twilio_message_sid = q.twilio_message_sid and m.direction = 'outbound'
left join lateral (
    select l.action_type, l.output_data, l.created_at from agent_actions_log l
    where l.message_id = q.id order by l.created_at desc, l.id desc limit 1
) a on true
where (q.status in ('queued', 'sending')
       or (q.status in ('sent', 'failed') and coalesce(q.sent_at, q.updated_at) >= %(since)s))
  and (%(user_id)s::uuid is null or q.user_id = %(user_id)s::uuid)
order by u.phone_number, q.user_id, q.scheduled_for, q.id
limit %(limit)s
"""

STATE_STYLE = {
    "due": "bold yellow",
    "deferred": "cyan",
    "sending": "bold magenta",
    "sent": "green",
    "delivered": "bold green",
    "undelivered": "bold red",
    "failed": "red",
}
PRIORITY_STYLE = {"urgent": "bold red", "high": "yellow", "medium": "", "low": "dim"}


@dataclass(frozen=True)
class Entry:
    """One message as the watch shows it."""

    user_id: str
    phone: str
    timezone: str
    state: str
    priority: str
    agent: str
    topic: str | None
    planned: datetime
    sent_at: datetime | None
    why: str
    text: str


def zone(name: str) -> ZoneInfo:
    """The user's zone; UTC for a name zoneinfo does not know (the schedule path refuses those)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def state_of(row: dict[str, Any], now: datetime) -> str:
    """due / deferred (queued, by its planned time), sending, and for what went out the receipt."""
    status = row["status"]
    if status == "queued":
        return "due" if row["scheduled_for"] <= now else "deferred"
    if status == "sent":
        receipt = row["delivery_status"]
        return receipt if receipt in ("delivered", "undelivered", "failed") else "sent"
    return str(status)


def why_of(row: dict[str, Any], state: str, tz: ZoneInfo, now: datetime) -> str:
    """Why it is where it is: for a waiting message the row's reason, the last decision logged
    about it when that says more, its last error and attempts; for one that went out, the receipt."""
    if state in ("sent", "delivered", "undelivered", "failed"):
        parts = [f"error {row['delivery_error_code']}"] if row["delivery_error_code"] else []
        if state == "delivered" and row["delivered_at"]:
            parts.append(f"delivered {local(row['delivered_at'], tz, now)}")
        if state == "failed" and row["last_error"]:
            parts.append(str(row["last_error"]))
        return "; ".join(parts or [str(row["reason"] or "")])
    parts = [str(row["reason"])] if row["reason"] and row["reason"] != "ok" else []
    if state == "sending" and row["lease_expires_at"]:
        parts.append(f"claimed until {local(row['lease_expires_at'], tz, now)}")
    action, action_reason = row["last_action"], row["last_action_reason"]
    if action and not (action == "scheduled" and action_reason == row["reason"]):
        said = f": {action_reason}" if action_reason and action_reason != row["reason"] else ""
        parts.append(f"last {action}{said} {local(row['last_action_at'], tz, now)}")
    if row["last_error"]:
        parts.append(str(row["last_error"]))
    if row["attempts"]:
        parts.append(f"attempt {row['attempts']}")
    return "; ".join(parts)


def entry(row: dict[str, Any], now: datetime) -> Entry:
    state = state_of(row, now)
    tz = zone(row["timezone"])
    return Entry(
        user_id=str(row["user_id"]),
        phone=row["phone_number"],
        timezone=row["timezone"],
        state=state,
        priority=row["priority"],
        agent=row["agent_id"],
        topic=row["topic_key"],
        planned=row["scheduled_for"],
        sent_at=row["sent_at"],
        why=why_of(row, state, tz, now),
        text=(f"[{row['part_count']} parts] " if row["part_count"] else "")
        + " ".join(str(row["text"]).split()),
    )


def snapshot(
    conn: psycopg.Connection[Any],
    now: datetime,
    *,
    since: timedelta = timedelta(hours=24),
    user_id: str | None = None,
    limit: int = 500,
) -> list[Entry]:
    """The queue at `now`: every queued and sending message, and what went out since `now - since`."""
    params = {"since": now - since, "user_id": user_id, "limit": limit}
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(SNAPSHOT_SQL, params).fetchall()
    return [entry(r, now) for r in rows]


def local(at: datetime | None, tz: ZoneInfo, now: datetime) -> str:
    """A time in the user's zone: the clock time, with the date when it is not the user's today."""
    if at is None:
        return ""
    here = at.astimezone(tz)
    today = now.astimezone(tz).date()
    shown = here.strftime("%H:%M:%S %Z") if here.date() == today else here.strftime("%b %d %H:%M:%S %Z")
    return shown


def relative(at: datetime, now: datetime) -> str:
    """`in 5m`, `2h ago`: how far the planned time is, so a deferral's length reads at a glance."""
    seconds = int((at - now).total_seconds())
    size = abs(seconds)
    unit, scale = next(
        (u, n) for u, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)) if size >= n or n == 1
    )
    amount = f"{size // scale}{unit}"
    return "now" if size == 0 else f"in {amount}" if seconds > 0 else f"{amount} ago"


def user_table(entries: Sequence[Entry], now: datetime) -> Table:
    first = entries[0]
    tz = zone(first.timezone)
    counts = {s: sum(1 for e in entries if e.state == s) for s in STATE_STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    table = Table(
        title=f"{first.phone}  {first.user_id}  {first.timezone}, local {local(now, tz, now)}",
        caption=summary,
        title_justify="left",
        caption_justify="left",
        expand=True,
    )
    table.add_column("state", no_wrap=True)
    table.add_column("priority", no_wrap=True)
    table.add_column("agent", no_wrap=True)
    table.add_column("topic", no_wrap=True)
    table.add_column("planned (local)", no_wrap=True)
    table.add_column("sent (local)", no_wrap=True)
    table.add_column("why", ratio=2)
    table.add_column("text", ratio=1, no_wrap=True, overflow="ellipsis")
    for e in entries:
        table.add_row(
            Text(e.state, style=STATE_STYLE.get(e.state, "")),
            Text(e.priority, style=PRIORITY_STYLE.get(e.priority, "")),
            e.agent,
            e.topic or "",
            f"{local(e.planned, tz, now)} ({relative(e.planned, now)})",
            local(e.sent_at, tz, now),
            e.why,
            e.text,
        )
    return table


def view(entries: Sequence[Entry], now: datetime) -> RenderableType:
    """Everything, one table per user, users in phone order."""
    by_user: dict[str, list[Entry]] = {}
    for e in entries:
        by_user.setdefault(e.user_id, []).append(e)
    header = Text(f"queue at {now.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC: {len(entries)} messages")
    if not by_user:
        return Group(header, Text("nothing queued, sending or recently sent", style="dim"))
    return Group(header, *(user_table(group, now) for group in by_user.values()))


def _user_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a UUID, got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shared.dev.watch", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL"), help="default: $DATABASE_URL"
    )
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    parser.add_argument("--since-hours", type=float, default=24.0, help="show what went out this recently")
    parser.add_argument("--user", type=_user_id, help="only this user id")
    parser.add_argument("--limit", type=int, default=500, help="at most this many messages (default 500)")
    parser.add_argument("--width", type=int, help="the console width (default: the terminal's)")
    return parser.parse_args(argv)


def connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
    conn.execute("set default_transaction_read_only = on")
    return conn


def main(
    argv: Sequence[str] | None = None,
    *,
    console: Console | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    args = parse_args(argv)
    out = console or Console(width=args.width)
    if not args.database_url:
        out.print("no database: set DATABASE_URL or pass --database-url (make dev prints it)")
        return 2
    since = timedelta(hours=args.since_hours)

    def frame(conn: psycopg.Connection[Any]) -> RenderableType:
        now = clock()
        return view(snapshot(conn, now, since=since, user_id=args.user, limit=args.limit), now)

    try:
        with connect(args.database_url) as conn:
            if args.once:
                out.print(frame(conn))
                return 0
            with Live(frame(conn), console=out, refresh_per_second=4, screen=False) as live:
                while True:
                    time.sleep(args.interval)
                    live.update(frame(conn))
    except psycopg.Error as exc:
        out.print(f"database error: {exc}".strip())
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
