"""The soak test's machinery: a virtual clock per worker thread, an in-process Cloud Tasks driven by
that clock (it loses, duplicates and jitters tasks and retries with backoff), an in-process Twilio
that injects faults, the traffic of several agents, and a checker that judges a finished run from
the database and Twilio's record alone, never from what the service answered.

Only what leaves the machine is faked here (Cloud Tasks, Twilio), as shared/ports.py allows; the
store is the real PostgresStore on real Postgres and the use cases are the real ones.

Time. Every event of one user ("lane") is handled in time order at its own virtual instant. Between
two sweeps, users are independent (no SQL function touches two users' rows), so the driver runs
lanes side by side in threads, one thread per lane at a time, and runs the sweep alone at the end of
each virtual minute. That is a conservative parallel discrete-event simulation: each user sees
exactly the sequence of states one sequential loop would give it, and the sweep sees every event
before its instant. The clock is thread-local for the same reason: a worker's `clock()` is the
instant of the event it is handling; the main thread's is the sweep's.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from shared.domain import Limits
from shared.errors import PermanentSendError, TransientSendError, Unavailable
from shared.models import SentRecord
from shared.sms import RECONCILE_CLOCK_SKEW, RECONCILE_LIST_LIMIT, same_text
from tests.support.fakes import VirtualClock

HOUR = timedelta(hours=1)


class InstanceCrash(BaseException):
    """The function instance dies mid-request (BaseException: nothing in the service catches it)."""


# --------------------------------------------------------------------------------------------------
# Clock and event lanes


class LaneClock(VirtualClock):
    """A VirtualClock whose `now` (and current lane) is per thread: each worker handles one event at
    its own instant; the main thread's instant is the sweep's."""

    def __init__(self, start: datetime) -> None:
        self._local = threading.local()
        super().__init__(start)

    @property
    def now(self) -> datetime:
        value: datetime = self._local.now
        return value

    @now.setter
    def now(self, value: datetime) -> None:
        self._local.now = value

    @property
    def lane(self) -> int | None:
        return getattr(self._local, "lane", None)

    @lane.setter
    def lane(self, value: int | None) -> None:
        self._local.lane = value


@dataclass(frozen=True, order=True)
class Event:
    at: datetime
    seq: int
    kind: str = field(compare=False)  # "schedule" | "inbound" | "task"
    payload: Any = field(compare=False)


class EventLanes:
    """Every future event, per lane: a heap of events per lane, and a heap of (at, lane) wake-ups that
    tells the driver which lanes have something due before an instant."""

    def __init__(self) -> None:
        self._heaps: dict[int, list[Event]] = defaultdict(list)
        self._wakeups: list[tuple[datetime, int]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def push(self, lane: int, at: datetime, kind: str, payload: Any) -> None:
        with self._lock:
            heapq.heappush(self._heaps[lane], Event(at, next(self._seq), kind, payload))
            heapq.heappush(self._wakeups, (at, lane))

    def lanes_before(self, before: datetime) -> list[int]:
        lanes: set[int] = set()
        with self._lock:
            while self._wakeups and self._wakeups[0][0] < before:
                lanes.add(heapq.heappop(self._wakeups)[1])
        return sorted(lanes)

    def pop_before(self, lane: int, before: datetime) -> Event | None:
        with self._lock:
            heap = self._heaps.get(lane)
            if heap and heap[0].at < before:
                return heapq.heappop(heap)
        return None

    def pending(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for h in self._heaps.values() for e in h if kind is None or e.kind == kind)


class SafeCounter:
    """A Counter several worker threads may add to."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._c[key]

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._c)


# --------------------------------------------------------------------------------------------------
# Cloud Tasks


@dataclass(frozen=True)
class Task:
    """One Cloud Task: the deliver body, and how many times the queue already tried it."""

    message_id: uuid.UUID
    generation: int
    attempt: int = 0
    duplicate: bool = False

    def body(self) -> dict[str, Any]:
        return {"messageId": str(self.message_id), "generation": self.generation}


class ClockTaskQueue:
    """The TaskQueue port in process, driven by the virtual clock: a task is an event at its
    schedule time in its user's lane (a heap of (at, message id, generation) per lane).

    Like Cloud Tasks: a name (message, generation) is created once (a second create is the
    AlreadyExists no-op); delivery is at least once (`duplicate` of the tasks fire twice) and may be
    a moment early or late; a failed attempt is retried with exponential backoff (10 s, 20 s, 40 s
    ... capped). Unlike it, `lose` of the tasks silently never fire and `create_failure` of the
    creates raise Unavailable: the sweep must find both.
    """

    def __init__(
        self,
        lanes: EventLanes,
        *,
        lane_of: Callable[[uuid.UUID], int],
        rng_of: Callable[[int], random.Random],
        lose: float = 0.0,
        duplicate: float = 0.0,
        create_failure: float = 0.0,
        early_seconds: float = 0.5,
        late_seconds: float = 2.0,
        min_backoff_seconds: float = 10.0,
        max_backoff_seconds: float = 300.0,
        max_attempts: int = 100,
        horizon: timedelta = timedelta(days=30) - timedelta(minutes=5),
    ) -> None:
        self.lanes = lanes
        self.lane_of = lane_of
        self.rng_of = rng_of
        self.lose = lose
        self.duplicate = duplicate
        self.create_failure = create_failure
        self.early_seconds = early_seconds
        self.late_seconds = late_seconds
        self.min_backoff_seconds = min_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.max_attempts = max_attempts
        self.horizon = horizon
        self.stats = SafeCounter()
        self._names: set[tuple[uuid.UUID, int]] = set()
        self._lock = threading.Lock()

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        if at - now > self.horizon:
            self.stats.add("beyond_horizon")
            return None
        name = f"tasks/{message_id}-{generation}"
        with self._lock:
            exists = (message_id, generation) in self._names
        if exists:
            self.stats.add("already_exists")
            return name
        lane = self.lane_of(message_id)
        rng = self.rng_of(lane)
        if rng.random() < self.create_failure:
            self.stats.add("create_failed")
            raise Unavailable("injected: Cloud Tasks unavailable")
        with self._lock:
            self._names.add((message_id, generation))
        self.stats.add("created")
        if rng.random() < self.lose:
            self.stats.add("lost")
            return name
        fire = max(now, at + timedelta(seconds=rng.uniform(-self.early_seconds, self.late_seconds)))
        self.lanes.push(lane, fire, "task", Task(message_id, generation))
        if rng.random() < self.duplicate:
            self.stats.add("duplicated")
            again = fire + timedelta(seconds=rng.uniform(0.1, 5.0))
            self.lanes.push(lane, again, "task", Task(message_id, generation, duplicate=True))
        return name

    def retry(self, lane: int, task: Task, now: datetime) -> None:
        """The attempt failed (non-2xx or no answer): try again after the queue's backoff."""
        attempt = task.attempt + 1
        if attempt >= self.max_attempts:
            self.stats.add("retries_exhausted")
            return
        delay = min(self.min_backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)
        self.stats.add("retried")
        self.lanes.push(lane, now + timedelta(seconds=delay), "task", replace(task, attempt=attempt))


# --------------------------------------------------------------------------------------------------
# Twilio


@dataclass(frozen=True)
class Sms:
    """One message Twilio accepted."""

    sid: str
    to: str
    body: str
    message_id: uuid.UUID
    at: datetime


@dataclass(frozen=True)
class TwilioFaults:
    """Per-send fault probabilities (one draw per send), and per-lookup for find_sent."""

    server_error: float = 0.02  # 5xx and Twilio never got it: maybe_sent (a 5xx proves nothing)
    server_error_accepted: float = 0.005  # Twilio created it, then its edge answered 502/504: maybe_sent
    rate_limited: float = 0.015  # 429 / 20429: transient, not sent
    timeout_accepted: float = 0.01  # Twilio accepted it, the answer was lost: maybe_sent
    timeout_lost: float = 0.004  # no answer, and Twilio never got it: maybe_sent
    crash_after_accept: float = 0.002  # the instance dies after Twilio accepted it
    crash_before_send: float = 0.002  # the instance dies after claiming, before calling Twilio
    lookup_unavailable: float = 0.05  # find_sent cannot reach Twilio


FAULTS = (
    "server_error",
    "server_error_accepted",
    "rate_limited",
    "timeout_accepted",
    "timeout_lost",
    "crash_after_accept",
    "crash_before_send",
)


class FakeTwilio:
    """The SmsSender port in process. Records every accepted message with the virtual time; injects
    transient faults (5xx, before or after Twilio created the message; 429), permanent faults for
    some numbers (21211 invalid, 21610 unsubscribed), timeouts after or without an accept
    (TransientSendError with maybe_sent) and instance crashes around the call; `forced` scripts
    the fault of one message's next send.

    `find_sent` answers from the record the way TwilioSender.find_sent does against Twilio: the
    recipient's newest RECONCILE_LIST_LIMIT messages, newest first, the first with the same body (same_text)
    accepted no earlier than `since` less RECONCILE_CLOCK_SKEW."""

    def __init__(
        self,
        clock: Callable[[], datetime],
        *,
        rng_of_phone: Callable[[str], random.Random],
        permanent: dict[str, str],
        faults: TwilioFaults,
    ) -> None:
        self.clock = clock
        self.rng_of_phone = rng_of_phone
        self.permanent = permanent
        self.faults = faults
        self.forced: dict[uuid.UUID, str] = {}  # the next send of this message fails so (a FAULTS name)
        self.records: list[Sms] = []
        self.by_to: dict[str, list[Sms]] = defaultdict(list)
        self.stats = SafeCounter()
        self._lock = threading.Lock()

    def _accept(self, to: str, body: str, message_id: uuid.UUID, rng: random.Random) -> Sms:
        sms = Sms(f"SM{rng.getrandbits(128):032x}", to, body, message_id, self.clock())
        with self._lock:
            self.records.append(sms)
            self.by_to[to].append(sms)
        return sms

    def _draw(self, rng: random.Random) -> str | None:
        f = self.faults
        r = rng.random()
        for name in FAULTS:
            r -= getattr(f, name)
            if r < 0:
                return name
        return None

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        self.stats.add("send_calls")
        code = self.permanent.get(to)
        if code is not None:
            self.stats.add(f"permanent_{code}")
            raise PermanentSendError(f"injected: Twilio {code} for {to}", code=code, status=400)
        rng = self.rng_of_phone(to)
        fault = self.forced.pop(message_id, None) or self._draw(rng)
        if fault is None:
            return self._accept(to, body, message_id, rng).sid
        self.stats.add(fault)
        if fault in ("server_error", "server_error_accepted"):
            status = rng.choice((500, 502, 503, 504))
            if fault == "server_error_accepted":
                self._accept(to, body, message_id, rng)
            # As TwilioSender classifies it: any 5xx may have been preceded by a create.
            error = TransientSendError(f"injected: Twilio {status}", status=status)
            error.maybe_sent = True
            raise error
        if fault == "rate_limited":
            raise TransientSendError("injected: Twilio 429", code="20429", status=429)
        if fault in ("timeout_accepted", "crash_after_accept"):
            self._accept(to, body, message_id, rng)
        if fault.startswith("crash"):
            raise InstanceCrash
        error = TransientSendError(f"injected: {fault}", code="timeout")
        error.maybe_sent = True
        raise error

    def find_sent(self, to: str, body: str, *, since: datetime) -> list[SentRecord]:
        self.stats.add("lookups")
        if self.rng_of_phone(to).random() < self.faults.lookup_unavailable:
            self.stats.add("lookup_unavailable")
            raise TransientSendError("injected: Twilio list unavailable", status=503)
        floor = since - RECONCILE_CLOCK_SKEW
        with self._lock:
            newest = list(reversed(self.by_to.get(to, [])[-RECONCILE_LIST_LIMIT:]))
        return [
            SentRecord(sid=m.sid, sent_at=m.at) for m in newest if same_text(m.body, body) and m.at >= floor
        ]

    def faults_injected(self) -> int:
        s = self.stats.snapshot()
        return sum(n for k, n in s.items() if k not in ("send_calls", "lookups"))


# --------------------------------------------------------------------------------------------------
# Users and traffic

TIMEZONES = (
    "America/New_York",
    "Europe/London",
    "Asia/Kolkata",
    "Asia/Tokyo",
    "Australia/Sydney",
    "America/Los_Angeles",
    "Asia/Kathmandu",  # +05:45
    "America/St_Johns",  # -03:30, US-style DST on 2025-03-09
    "Pacific/Chatham",  # +13:45
    "UTC",
)
# Custom quiet windows: wrapping, not wrapping, daytime, ending inside the 2025-03-09 US DST gap,
# and start == end (none).
QUIET_WINDOWS = (
    (time(21, 30), time(7, 15)),
    (time(23, 0), time(6, 0)),
    (time(0, 0), time(9, 0)),
    (time(13, 0), time(14, 30)),
    (time(22, 0), time(2, 30)),
    (time(20, 0), time(20, 0)),
)


@dataclass
class SoakUser:
    lane: int
    phone: str
    timezone: str
    settings: dict[str, Any]  # mq_upsert_user's keyword parameters (without p_)
    id: uuid.UUID
    permanent_code: str | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def make_users(n: int, rng: random.Random, *, permanent: int = 8) -> list[SoakUser]:
    """`n` users spread evenly over TIMEZONES, some with their own limits and quiet hours; the first
    `permanent` numbers are refused by Twilio for good (half 21211, half 21610)."""
    users = []
    for lane in range(n):
        settings: dict[str, Any] = {}
        if rng.random() < 0.10:
            settings["daily_limit"] = rng.choice((3, 5, 20))
        if rng.random() < 0.10:
            settings["hourly_limit"] = rng.choice((1, 3, 4))
        if rng.random() < 0.10:
            start, end = rng.choice(QUIET_WINDOWS)
            settings["quiet_hours_start"] = start
            settings["quiet_hours_end"] = end
        if rng.random() < 0.03:
            settings["quiet_hours_enabled"] = False
        code = None
        if lane < permanent:
            code = "21211" if lane % 2 == 0 else "21610"
        user_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        tz = TIMEZONES[lane % len(TIMEZONES)]
        users.append(SoakUser(lane, f"+1444{lane:07d}", tz, settings, user_id, permanent_code=code))
    return users


@dataclass(frozen=True)
class ScheduleCall:
    body: dict[str, Any]
    replay: bool = False  # the agent sending the same request again (it lost the first answer)


@dataclass(frozen=True)
class Inbound:
    body: str
    sid: str


@dataclass(frozen=True)
class Agent:
    name: str
    priorities: tuple[float, float, float, float]  # urgent, high, medium, low
    expires: float  # share of messages with an expiresAt
    no_delay: float  # share with canDelay false
    templates: tuple[str, ...] = ()  # fixed texts it sends (else every text is unique)


AGENTS = (
    Agent("onboarding_agent", (0.0, 0.3, 0.6, 0.1), 0.05, 0.05),
    Agent("coach_agent", (0.02, 0.2, 0.58, 0.2), 0.1, 0.05),
    Agent(
        "reminder_agent",
        (0.05, 0.35, 0.4, 0.2),
        0.3,
        0.1,
        templates=("Reminder: your session starts soon", "Don't forget to log today's progress"),
    ),
    Agent("billing_agent", (0.15, 0.35, 0.4, 0.1), 0.4, 0.15),
    Agent("marketing_agent", (0.0, 0.0, 0.2, 0.8), 0.2, 0.0),
)
SUPPORT = Agent("support_agent", (0.25, 0.75, 0.0, 0.0), 0.3, 0.4)
PRIORITIES = ("urgent", "high", "medium", "low")
BURST_SIZES = ((1, 0.35), (2, 0.25), (3, 0.15), (4, 0.10), (5, 0.08), (6, 0.07))


@dataclass(frozen=True)
class TrafficShape:
    bursts_per_day: float = 0.4  # agent bursts per user per day (Poisson)
    conversations_per_day: float = 0.4  # the user writes to us (1-3 messages), Poisson per day
    reply_chance: float = 0.7  # the support agent answers an inbound message
    replay_chance: float = 0.03  # the agent sends the same request again
    night_share: float = 0.2  # bursts at any hour; the others in the user's 07:00-23:00


def _poisson(rng: random.Random, lam: float) -> int:
    k, p, limit = 0, rng.random(), pow(2.718281828459045, -lam)
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _at_local(d: date, seconds: float, tz: ZoneInfo) -> datetime:
    wall = datetime.combine(d, time(0)) + timedelta(seconds=seconds)
    return wall.replace(tzinfo=tz).astimezone(UTC)


class TrafficPlan:
    """Every agent request and inbound message of the run, generated up front per user."""

    def __init__(self, users: list[SoakUser], start: datetime, days: int, shape: TrafficShape, seed: int):
        self.events: list[tuple[int, datetime, str, Any]] = []
        self._n = itertools.count()
        for u in users:
            rng = random.Random(seed * 7919 + u.lane)
            first = start.astimezone(u.tz).date() - timedelta(days=1)
            end = start + timedelta(days=days)
            for k in range(days + 2):
                d = first + timedelta(days=k)
                for _ in range(_poisson(rng, shape.bursts_per_day)):
                    if rng.random() < shape.night_share:
                        secs = rng.uniform(0, 86400)
                    else:
                        secs = rng.uniform(7 * 3600, 23 * 3600)
                    at = _at_local(d, secs, u.tz)
                    if start <= at < end:
                        self._burst(u, rng, at, rng.choice(AGENTS), shape)
                for _ in range(_poisson(rng, shape.conversations_per_day)):
                    at = _at_local(d, rng.uniform(0, 86400), u.tz)
                    if start <= at < end:
                        self._conversation(u, rng, at, shape)
        self.events.sort(key=lambda e: (e[1], e[0]))

    def _burst(
        self, u: SoakUser, rng: random.Random, at: datetime, agent: Agent, shape: TrafficShape
    ) -> None:
        sizes, weights = zip(*BURST_SIZES, strict=True)
        n = rng.choices(sizes, weights)[0]
        for _ in range(n):
            self._request(u, rng, at, agent, shape)
            at += timedelta(seconds=rng.uniform(0, 20))

    def _conversation(self, u: SoakUser, rng: random.Random, at: datetime, shape: TrafficShape) -> None:
        for _ in range(rng.randint(1, 3)):
            self.events.append((u.lane, at, "inbound", Inbound("hey", f"SMin{u.lane}x{next(self._n)}")))
            if rng.random() < shape.reply_chance:
                reply = at + timedelta(seconds=rng.uniform(3, 90))
                for _ in range(2 if rng.random() < 0.15 else 1):
                    self._request(u, rng, reply, SUPPORT, shape)
                    reply += timedelta(seconds=rng.uniform(1, 10))
            at += timedelta(seconds=rng.uniform(30, 360))

    def _request(
        self, u: SoakUser, rng: random.Random, at: datetime, agent: Agent, shape: TrafficShape
    ) -> None:
        n = next(self._n)
        if agent.templates and rng.random() < 0.5:
            text = rng.choice(agent.templates)
        else:
            text = f"{agent.name} #{n} for user {u.lane}"
        body: dict[str, Any] = {
            "userId": str(u.id),
            "agentId": agent.name,
            "messageData": {"content": text},
            "priority": rng.choices(PRIORITIES, agent.priorities)[0],
            "idempotencyKey": f"{agent.name}-{n}",
        }
        if rng.random() < agent.no_delay:
            body["canDelay"] = False
        if rng.random() < agent.expires:
            expires = at + timedelta(seconds=rng.uniform(15 * 60, 10 * 3600))
            body["expiresAt"] = expires.isoformat().replace("+00:00", "Z")
        self.events.append((u.lane, at, "schedule", ScheduleCall(body)))
        if rng.random() < shape.replay_chance:
            again = at + timedelta(seconds=rng.uniform(1, 30))
            self.events.append((u.lane, again, "schedule", ScheduleCall(body, replay=True)))

    def counts(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for _, _, kind, payload in self.events:
            c[kind] += 1
            if isinstance(payload, ScheduleCall) and payload.replay:
                c["replays"] += 1
        return c


# --------------------------------------------------------------------------------------------------
# The checker: the database and Twilio's record, nothing the service said


@dataclass
class Judgement:
    sends: int = 0
    cooldown: list[str] = field(default_factory=list)
    hourly: list[str] = field(default_factory=list)
    daily: list[str] = field(default_factory=list)
    quiet: list[str] = field(default_factory=list)
    sent_after_expiry: list[str] = field(default_factory=list)
    sent_twice: list[str] = field(default_factory=list)  # one message id, several Twilio messages
    unknown_sid: list[str] = field(default_factory=list)  # a 'sent' row whose sid Twilio never issued
    shared_sid: list[str] = field(default_factory=list)  # one sid on several rows, or another's sid
    unrecorded: list[str] = field(default_factory=list)  # Twilio sent it; the row does not say so
    budget_mismatch: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    quiet_sends_active: int = 0  # sends inside quiet hours allowed by the active exception
    quiet_sends_urgent: int = 0

    @property
    def violations(self) -> int:
        return sum(map(len, (self.cooldown, self.hourly, self.daily, self.quiet, self.sent_after_expiry)))

    @property
    def duplicates(self) -> int:
        return sum(map(len, (self.sent_twice, self.unknown_sid, self.shared_sid, self.unrecorded)))


def _in_window(local: time, start: time, end: time) -> bool:
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def judge(database_url: str, records: Iterable[Sms], limits: Limits) -> Judgement:
    """Check every limit on what Twilio actually accepted, per user, against the users' settings as
    stored; and every 'sent' row against Twilio's record."""
    j = Judgement()
    with psycopg.connect(database_url, autocommit=True) as conn:
        users = {
            r[0]: r
            for r in conn.execute(
                "select phone_number, id, timezone, quiet_hours_start, quiet_hours_end, "
                "quiet_hours_enabled, daily_limit, hourly_limit from users"
            ).fetchall()
        }
        rows = {
            r[0]: r
            for r in conn.execute(
                "select id, user_id, status, priority, expires_at, twilio_message_sid from message_queue"
            ).fetchall()
        }
        inbound: dict[uuid.UUID, list[datetime]] = defaultdict(list)
        for user_id, at in conn.execute(
            "select user_id, created_at from messages where direction = 'inbound' order by created_at"
        ).fetchall():
            inbound[user_id].append(at)
        budgets = {
            (r[0], r[1]): r[2]
            for r in conn.execute("select user_id, date, messages_sent from user_message_budget").fetchall()
        }
    j.rows = len(rows)
    j.statuses = Counter(r[2] for r in rows.values())

    by_phone: dict[str, list[Sms]] = defaultdict(list)
    by_message: dict[uuid.UUID, list[Sms]] = defaultdict(list)
    by_sid: dict[str, Sms] = {}
    for s in records:
        by_phone[s.to].append(s)
        by_message[s.message_id].append(s)
        by_sid[s.sid] = s
        j.sends += 1

    cooldown = timedelta(seconds=limits.cooldown_seconds)
    active = timedelta(seconds=limits.active_window_seconds)
    counted: Counter[tuple[uuid.UUID, date]] = Counter()
    for phone, sends in by_phone.items():
        _, user_id, tz_name, q_start, q_end, q_enabled, daily, hourly = users[phone]
        tz = ZoneInfo(tz_name)
        daily = daily or limits.daily_limit
        hourly = hourly or limits.hourly_limit
        q_start = q_start or limits.quiet_hours_start
        q_end = q_end or limits.quiet_hours_end
        q_enabled = q_enabled and limits.quiet_hours_enabled
        sends.sort(key=lambda s: s.at)
        times = [s.at for s in sends]
        for a, b in itertools.pairwise(sends):
            if b.at - a.at < cooldown:
                j.cooldown.append(f"{phone}: {a.message_id} at {a.at} then {b.message_id} at {b.at}")
        for i in range(len(times) - hourly):
            if times[i + hourly] - times[i] < HOUR:
                j.hourly.append(f"{phone}: {hourly + 1} sends in {times[i]} .. {times[i + hourly]}")
        per_day = Counter(t.astimezone(tz).date() for t in times)
        for d, n in per_day.items():
            counted[(user_id, d)] = n
            if n > daily:
                j.daily.append(f"{phone}: {n} sends on local {d} (limit {daily})")
        ins = inbound.get(user_id, [])
        for s in sends:
            row = rows.get(s.message_id)
            if row is not None and row[4] is not None and s.at >= row[4]:
                j.sent_after_expiry.append(f"{s.message_id}: sent {s.at}, expired {row[4]}")
            if not q_enabled or not _in_window(s.at.astimezone(tz).time(), q_start, q_end):
                continue
            k = bisect.bisect_right(ins, s.at)
            if k and s.at - ins[k - 1] < active:
                j.quiet_sends_active += 1
            elif row is not None and row[3] == "urgent":
                j.quiet_sends_urgent += 1
            else:
                local = s.at.astimezone(tz)
                j.quiet.append(f"{phone} ({tz_name}): {s.message_id} ({row and row[3]}) at local {local}")

    for mid, sends in by_message.items():
        if len(sends) > 1:
            j.sent_twice.append(f"{mid}: {len(sends)} Twilio messages {[s.sid for s in sends]}")
        row = rows.get(mid)
        if row is None or row[2] != "sent" or row[5] not in {s.sid for s in sends}:
            j.unrecorded.append(f"{mid}: Twilio sent it; row {row and (row[2], row[5])}")
    sid_rows: Counter[str] = Counter()
    for mid, row in rows.items():
        if row[2] != "sent":
            continue
        sid_rows[row[5]] += 1
        sms = by_sid.get(row[5])
        if sms is None:
            j.unknown_sid.append(f"{mid}: sent with sid {row[5]}, which Twilio never issued")
        elif sms.message_id != mid:
            j.shared_sid.append(f"{mid}: recorded with sid {row[5]}, which Twilio sent for {sms.message_id}")
    j.shared_sid.extend(f"sid {sid} on {n} rows" for sid, n in sid_rows.items() if n > 1)
    for key in set(counted) | set(budgets):
        if counted.get(key, 0) != budgets.get(key, 0):
            j.budget_mismatch.append(f"{key}: Twilio {counted.get(key, 0)}, budget row {budgets.get(key, 0)}")
    return j
