"""No caller floods a user or the shared queue: a user's queue limit and an agent's schedule rate,
each refused with 429 and stored nothing; and a user with a long queue gets each message its own
slot, so other users' messages go out on time. Real Postgres, functions-framework's app, the
virtual clock."""

from __future__ import annotations

import heapq
import itertools
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared import bootstrap, service
from shared.config import Settings
from shared.errors import UserQueueFull
from shared.models import NewMessage
from shared.parsing import ScheduleRequest
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import MAIN, POLICY, T0
from tests.support.factories import make_user, sql, table_counts
from tests.support.fakes import RecordingTaskQueue, VirtualClock


@pytest.fixture
def container_settings() -> Settings:
    return Settings.from_env({"USER_QUEUE_LIMIT": "3", "AGENT_RATE_PER_MINUTE": "5"})


@pytest.fixture
def client(container: bootstrap.Container) -> FlaskClient:
    return create_app("schedule_message", MAIN).test_client()


def body(user: uuid.UUID, agent: str = "agent_a", **extra: Any) -> dict[str, Any]:
    return {"userId": str(user), "agentId": agent, "messageData": {"content": "hi"}} | extra


def test_the_deployed_defaults() -> None:
    assert (Settings().policy.user_queue_limit, Settings().policy.agent_rate_per_minute) == (50, 600)
    none = Settings.from_env({"USER_QUEUE_LIMIT": "0", "AGENT_RATE_PER_MINUTE": "0"}).policy
    assert none.admission("a", None).user_queue_limit is None
    assert none.admission("a", None).agent_rate_per_minute is None


def test_a_full_user_queue_is_429_with_the_count_and_stores_nothing(
    client: FlaskClient, store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store)
    ids = [client.post("/", json=body(user, agent=f"agent_{i}")).get_json()["messageId"] for i in range(3)]
    before, tasks_before = table_counts(database_url), len(tasks.tasks)
    resp = client.post("/", json=body(user, agent="agent_x"))
    assert resp.status_code == 429
    answer = resp.get_json()
    assert answer["error"] == "user_queue_full" and (answer["queued"], answer["limit"]) == (3, 3)
    assert "3 messages queued" in answer["message"]
    assert "Retry-After" not in resp.headers  # no time is known: it is up to the user's queue
    assert table_counts(database_url) == before and len(tasks.tasks) == tasks_before
    # another user is not affected; a cancel frees a place
    assert client.post("/", json=body(make_user(store), agent="agent_x")).status_code == 201
    assert client.post(f"/messages/{ids[0]}/cancel").status_code == 200
    assert client.post("/", json=body(user, agent="agent_x")).status_code == 201


def test_a_message_that_supersedes_one_takes_its_place_and_a_replay_is_answered(
    client: FlaskClient, store: PostgresStore, database_url: str
) -> None:
    user = make_user(store)
    first = client.post("/", json=body(user, topicKey="weather", idempotencyKey="w1")).get_json()
    for i in range(2):
        assert client.post("/", json=body(user, agent=f"agent_{i}")).status_code == 201
    newer = client.post("/", json=body(user, topicKey="weather"))
    assert newer.status_code == 201 and newer.get_json()["superseded"] == [first["messageId"]]
    replay = client.post("/", json=body(user, topicKey="weather", idempotencyKey="w1"))
    assert replay.status_code == 200 and replay.get_json()["messageId"] == first["messageId"]
    assert client.post("/", json=body(user, topicKey="other")).status_code == 429


def test_an_agent_past_its_rate_is_429_with_retry_after_until_the_window_frees(
    client: FlaskClient, store: PostgresStore, clock: VirtualClock, database_url: str
) -> None:
    users = [make_user(store) for _ in range(6)]
    for user in users[:5]:
        assert client.post("/", json=body(user)).status_code == 201
        clock.advance(timedelta(seconds=10))  # at T0, T0+10 s, ... T0+40 s
    clock.now = T0 + timedelta(seconds=45)
    before = table_counts(database_url)
    resp = client.post("/", json=body(users[5]))
    assert resp.status_code == 429
    answer = resp.get_json()
    assert answer["error"] == "agent_rate_limited" and answer["limit"] == 5
    assert resp.headers["Retry-After"] == "15" and answer["retryAfterSeconds"] == 15  # T0 leaves at T0+60 s
    assert table_counts(database_url) == before
    assert client.post("/", json=body(users[5], agent="agent_b")).status_code == 201  # per agent
    clock.now = T0 + timedelta(seconds=60)
    assert client.post("/", json=body(users[5])).status_code == 201


def test_the_store_enforces_the_queue_limit_itself(store: PostgresStore) -> None:
    """Two requests that both passed the early check cannot both take the last place: mq_enqueue
    counts again under the user's lock."""
    user = make_user(store)
    config = replace(POLICY, user_queue_limit=1)
    request = ScheduleRequest.parse(body(user), now=T0, max_content_length=1600)
    admission = config.admission(request.agent_id, None)
    message = NewMessage(request=request, scheduled_for=T0, reason="ok", now=T0, admission=admission)
    store.enqueue(message)
    with pytest.raises(UserQueueFull):
        store.enqueue(message)


# --------------------------------------------------------------------------------------------------
# A flood: 1,200 messages for one user


def _gaps(times: list[datetime]) -> timedelta:
    ordered = sorted(times)
    return min(b - a for a, b in itertools.pairwise(ordered))


class Queue:
    """The shared Cloud Tasks queue on the virtual clock: due tasks dispatched in time order at the
    deployed rate (1 a second), each to the real deliver use case; a task the delivery creates
    (a deferral) joins the queue."""

    RATE = timedelta(seconds=1)

    def __init__(
        self, store: PostgresStore, tasks: RecordingTaskQueue, sms: TwilioSender, clock: VirtualClock
    ):
        self.store, self.tasks, self.sms, self.clock = store, tasks, sms, clock
        self.heap: list[tuple[datetime, int, uuid.UUID, int]] = []
        self.seen = 0
        self.dispatched: dict[uuid.UUID, datetime] = {}

    def _take_new(self) -> None:
        for t in self.tasks.tasks[self.seen :]:
            heapq.heappush(self.heap, (t.at, self.seen, t.message_id, t.generation))
            self.seen += 1

    def run_until(self, end: datetime, config: service.Policy) -> None:
        free_at = self.clock.now
        self._take_new()
        while self.heap and self.heap[0][0] <= end:
            at, _, message_id, generation = heapq.heappop(self.heap)
            self.clock.now = max(at, free_at)
            free_at = self.clock.now + self.RATE
            outcome = service.deliver(
                {"messageId": str(message_id), "generation": generation},
                store=self.store, tasks=self.tasks, sms=self.sms, config=config, clock=self.clock,
            )  # fmt: skip
            if outcome.action == "sent":
                self.dispatched[message_id] = self.clock.now
            self._take_new()


def test_a_flood_for_one_user_is_spread_and_other_users_are_on_time(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    clock: VirtualClock,
    database_url: str,
) -> None:
    config = replace(POLICY, user_queue_limit=2000, agent_rate_per_minute=0)
    flooded = make_user(store)
    for i in range(1200):
        flood = body(flooded) | {"messageData": {"content": f"flood {i}"}}
        service.schedule(flood, store=store, tasks=tasks, config=config, now=T0)
    planned = [t.at for t in tasks.tasks]
    assert len(planned) == len({t.message_id for t in tasks.tasks}) <= 1200  # past the task horizon: none
    assert _gaps(planned) >= timedelta(seconds=30), "two of one user's messages due within 30 s"

    others = [make_user(store) for _ in range(5)]
    wanted: dict[uuid.UUID, datetime] = {}
    for n, user in enumerate(others):
        at = T0 + timedelta(minutes=17 * n + 3)
        result = service.schedule(body(user), store=store, tasks=tasks, config=config, now=at)
        assert result.message.scheduled_for == at  # planned at once: the flood is another user's
        wanted[result.message.id] = at
    queue = Queue(store, tasks, twilio_sender, clock)
    queue.run_until(T0 + timedelta(hours=26), config)

    for message_id, at in wanted.items():
        assert queue.dispatched[message_id] - at <= Queue.RATE, "another user's message was held up"
    sent = [m for m in queue.dispatched if m not in wanted]
    assert 10 <= len(sent) <= 20  # the flooded user's daily limit, over a day and two hours
    queued = _queued_times(database_url, flooded)
    assert len(queued) == 1200 - len(sent)
    assert _gaps(queued) >= timedelta(seconds=30), "re-plans put two messages on one instant"


def _queued_times(database_url: str, user: uuid.UUID) -> list[datetime]:
    rows = sql(
        database_url, "select scheduled_for from message_queue where user_id = %s and status = 'queued'", user
    )
    return [r[0] for r in rows]


def test_messages_without_a_topic_count_against_a_request_with_one(
    client: FlaskClient, store: PostgresStore
) -> None:
    user = make_user(store)
    for i in range(3):
        assert client.post("/", json=body(user, agent=f"agent_{i}")).status_code == 201
    resp = client.post("/", json=body(user, topicKey="weather"))
    assert resp.status_code == 429 and resp.get_json()["queued"] == 3
