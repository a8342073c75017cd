"""CloudTasksQueue against the real gcloud-tasks-emulator, through the real google-cloud-tasks client.

Tasks are POSTed to a small HTTP server in this process, which records what arrives and when.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.cloud import tasks_v2

from shared.dev.tasks_emulator import TasksEmulator
from shared.errors import Unavailable
from shared.tasks import DEFAULT_HORIZON, CloudTasksQueue, build_tasks_client, task_id
from tests.integration.tasks_fixtures import TASKS_QUEUE_PATH

DELIVERY_WAIT = 5.0


@dataclass(frozen=True)
class Delivery:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.time(), comparable with the emulator's clock

    @property
    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


class Receiver:
    """Stands in for deliver_message: records every request; answers 503 to the first N of a message."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.fail_first: dict[str, int] = {}
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                delivery = Delivery(
                    path=self.path,
                    method="POST",
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    received_at=time.time(),
                )
                status = receiver._record(delivery)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deliver"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, delivery: Delivery) -> int:
        with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()
            message_id = str(json.loads(delivery.body).get("messageId"))
            if self.fail_first.get(message_id, 0) > 0:
                self.fail_first[message_id] -= 1
                return 503
            return 200

    def for_message(self, message_id: uuid.UUID) -> list[Delivery]:
        with self._changed:
            return [d for d in self.deliveries if d.json.get("messageId") == str(message_id)]

    def wait_for(
        self, message_id: uuid.UUID, count: int = 1, timeout: float = DELIVERY_WAIT
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := self.for_message(message_id)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(found)} of {count} deliveries for {message_id} in {timeout}s")
                self._changed.wait(remaining)
            return found

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def queue_path(tasks_client: tasks_v2.CloudTasksClient) -> Iterator[str]:
    # A queue of our own: the emulator dispatches each queue on its own thread, so other
    # modules' slow or failing handlers cannot delay these timing checks, and deleting it at the end
    # stops any leftover task of ours from being retried forever.
    parent = TASKS_QUEUE_PATH.rsplit("/queues/", 1)[0]
    path = f"{parent}/queues/tasks-adapter-{uuid.uuid4().hex[:8]}"
    tasks_client.create_queue(parent=parent, queue=tasks_v2.Queue(name=path), timeout=5)
    yield path
    tasks_client.delete_queue(name=path, timeout=5)


@pytest.fixture
def queue(tasks_client: tasks_v2.CloudTasksClient, queue_path: str, receiver: Receiver) -> CloudTasksQueue:
    return CloudTasksQueue(
        tasks_client, queue_path=queue_path, deliver_url=receiver.url, service_account=None
    )


def pending_names(client: tasks_v2.CloudTasksClient, queue_path: str) -> set[str]:
    return {task.name for task in client.list_tasks(parent=queue_path, timeout=5)}


def utcnow() -> datetime:
    return datetime.now(UTC)


def test_task_for_now_is_posted_with_json_body_and_content_type(
    queue: CloudTasksQueue, receiver: Receiver
) -> None:
    message_id = uuid.uuid4()
    now = utcnow()

    name = queue.schedule(message_id, 3, now, now)

    [delivery] = receiver.wait_for(message_id)
    assert name == queue.task_name(message_id, 3)
    assert delivery.method == "POST"
    assert delivery.path == "/deliver"
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.json == {"messageId": str(message_id), "generation": 3}
    assert delivery.headers["x-cloudtasks-taskname"] == task_id(message_id, 3)
    assert "authorization" not in delivery.headers


def test_past_time_is_scheduled_now(queue: CloudTasksQueue, receiver: Receiver) -> None:
    message_id = uuid.uuid4()
    now = utcnow()

    queue.schedule(message_id, 1, now - timedelta(hours=2), now)

    [delivery] = receiver.wait_for(message_id)
    assert delivery.json["generation"] == 1


def test_future_task_is_not_delivered_early(queue: CloudTasksQueue, receiver: Receiver) -> None:
    message_id = uuid.uuid4()
    now = utcnow()
    at = now + timedelta(seconds=2)

    queue.schedule(message_id, 1, at, now)

    [delivery] = receiver.wait_for(message_id, timeout=2 + DELIVERY_WAIT)
    assert delivery.received_at >= at.timestamp() - 0.05, "delivered before its schedule_time"
    assert delivery.received_at <= at.timestamp() + 2.0


def test_task_name_is_deterministic_per_message_and_generation(
    queue: CloudTasksQueue, tasks_client: tasks_v2.CloudTasksClient, queue_path: str
) -> None:
    message_id, other_id = uuid.uuid4(), uuid.uuid4()
    now = utcnow()
    # A day ahead: the task stays pending, so the emulator can show what was stored.
    at = now + timedelta(days=1)

    name = queue.schedule(message_id, 1, at, now)

    assert name is not None
    assert name == queue.task_name(message_id, 1)
    assert name.startswith(f"{queue_path}/tasks/")
    task_part = name.rsplit("/", 1)[1]
    assert len(task_part) == 40 and int(task_part, 16) >= 0
    assert queue.task_name(message_id, 2) != name
    assert queue.task_name(other_id, 1) != name
    [stored] = [t for t in tasks_client.list_tasks(parent=queue_path, timeout=5) if t.name == name]
    assert stored.schedule_time == at
    assert json.loads(stored.http_request.body) == {"messageId": str(message_id), "generation": 1}


def test_beyond_horizon_creates_nothing(
    queue: CloudTasksQueue, tasks_client: tasks_v2.CloudTasksClient, queue_path: str, receiver: Receiver
) -> None:
    message_id = uuid.uuid4()
    now = utcnow()

    assert queue.schedule(message_id, 1, now + DEFAULT_HORIZON + timedelta(seconds=1), now) is None
    on_horizon = queue.schedule(message_id, 2, now + DEFAULT_HORIZON, now)

    assert on_horizon == queue.task_name(message_id, 2)
    pending = pending_names(tasks_client, queue_path)
    assert queue.task_name(message_id, 1) not in pending
    assert on_horizon in pending
    assert receiver.for_message(message_id) == []


def test_scheduling_the_same_generation_twice_does_not_raise(
    queue: CloudTasksQueue, receiver: Receiver
) -> None:
    message_id = uuid.uuid4()
    now = utcnow()

    first = queue.schedule(message_id, 5, now, now)
    second = queue.schedule(message_id, 5, now, now)

    assert first == second == queue.task_name(message_id, 5)
    # The emulator does not deduplicate names (real Cloud Tasks answers AlreadyExists), so this may
    # arrive twice; deliver_message is idempotent per generation.
    deliveries = receiver.wait_for(message_id)
    assert {d.body for d in deliveries} == {deliveries[0].body}


def test_a_failed_delivery_is_retried(queue: CloudTasksQueue, receiver: Receiver) -> None:
    message_id = uuid.uuid4()
    receiver.fail_first[str(message_id)] = 1
    now = utcnow()

    queue.schedule(message_id, 1, now, now)

    first, retry = receiver.wait_for(message_id, count=2)
    assert first.body == retry.body
    assert first.headers["x-cloudtasks-taskretrycount"] == "0"
    assert retry.headers["x-cloudtasks-taskretrycount"] == "1"


def test_unknown_queue_raises_unavailable(
    tasks_client: tasks_v2.CloudTasksClient, receiver: Receiver
) -> None:
    missing = TASKS_QUEUE_PATH.rsplit("/", 1)[0] + "/no-such-queue"
    queue = CloudTasksQueue(tasks_client, queue_path=missing, deliver_url=receiver.url, service_account=None)
    message_id = uuid.uuid4()
    now = utcnow()

    with pytest.raises(Unavailable) as raised:
        queue.schedule(message_id, 1, now, now)

    assert str(message_id) in raised.value.message
    assert "FailedPrecondition" in raised.value.message


def test_stopped_emulator_raises_unavailable_within_the_timeout(
    tasks_emulator: TasksEmulator, receiver: Receiver
) -> None:
    # An emulator of its own to stop; requesting the session one inherits its skip-or-fail check.
    path = "projects/test-project/locations/us-central1/queues/stopped"
    emulator = TasksEmulator(path, python=tasks_emulator.python)
    with emulator, build_tasks_client(emulator.host) as client:
        timeout = timedelta(seconds=1)
        queue = CloudTasksQueue(
            client, queue_path=path, deliver_url=receiver.url, service_account=None, timeout=timeout
        )
        now = utcnow()
        assert queue.schedule(uuid.uuid4(), 1, now + timedelta(days=1), now) is not None

        emulator.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            queue.schedule(uuid.uuid4(), 1, now, now)
        elapsed = time.monotonic() - started

    assert elapsed < timeout.total_seconds() + 1.0
    assert "could not create the Cloud Task" in raised.value.message


def _listening(port: int) -> set[str]:
    """The local addresses listening on `port`, from the kernel's socket tables."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_emulator_listens_on_loopback_only(tasks_emulator: TasksEmulator) -> None:
    """Like everything the local stack runs: not on every interface, as the emulator would."""
    assert tasks_emulator.port is not None
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as ::ffff:127.0.0.1
    listening = _listening(tasks_emulator.port)
    assert listening and listening <= loopback, listening


def test_tasks_due_together_are_in_flight_together(
    tasks_client: tasks_v2.CloudTasksClient, queue_path: str
) -> None:
    """As Cloud Tasks (max_concurrent_dispatches), not one at a time: five tasks due at once reach a
    handler that holds every request until all five are in; one slow delivery does not hold up
    the rest of the queue."""
    held = threading.Condition()
    in_flight: list[str] = []
    release = threading.Event()

    class Holding(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with held:
                in_flight.append(str(json.loads(body)["messageId"]))
                held.notify_all()
            release.wait(DELIVERY_WAIT)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        queue = CloudTasksQueue(
            tasks_client,
            queue_path=queue_path,
            deliver_url=f"http://127.0.0.1:{server.server_address[1]}/deliver",
            service_account=None,
        )
        now = utcnow()
        ids = {uuid.uuid4() for _ in range(5)}
        for message_id in ids:
            queue.schedule(message_id, 1, now, now)
        with held:
            held.wait_for(lambda: len(in_flight) >= len(ids), timeout=DELIVERY_WAIT)
            seen = set(in_flight)
    finally:
        release.set()
        server.shutdown()
        server.server_close()

    assert seen == {str(i) for i in ids}
