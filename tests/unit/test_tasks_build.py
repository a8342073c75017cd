"""The Task proto and the error mapping of shared.tasks, without a server.

The client is replaced by a stub only here, because the emulator can produce neither AlreadyExists
(it does not deduplicate names) nor a transient UNAVAILABLE followed by success.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import tasks_v2

from shared.errors import Unavailable
from shared.tasks import CloudTasksQueue, build_task, task_id, task_name

QUEUE = "projects/p/locations/l/queues/q"
URL = "https://deliver.example.run.app/deliver"
MESSAGE = uuid.UUID("12345678-1234-5678-1234-567812345678")


def make(service_account: str | None = None, **overrides: Any) -> tasks_v2.Task:
    args: dict[str, Any] = {
        "name": task_name(QUEUE, MESSAGE, 7),
        "deliver_url": URL,
        "message_id": MESSAGE,
        "generation": 7,
        "schedule_at": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "service_account": service_account,
        "dispatch_deadline": timedelta(seconds=90),
    }
    args.update(overrides)
    return build_task(**args)


def test_http_request_posts_the_json_body_to_the_deliver_url() -> None:
    pb = tasks_v2.Task.pb(make())

    assert pb.name == f"{QUEUE}/tasks/{task_id(MESSAGE, 7)}"
    assert pb.http_request.url == URL
    assert pb.http_request.http_method == tasks_v2.HttpMethod.POST
    assert dict(pb.http_request.headers) == {"Content-Type": "application/json"}
    assert json.loads(pb.http_request.body) == {"messageId": str(MESSAGE), "generation": 7}


def test_schedule_time_and_dispatch_deadline() -> None:
    pb = tasks_v2.Task.pb(make())

    assert pb.schedule_time.seconds == int(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert pb.schedule_time.nanos == 678_901_000
    assert pb.dispatch_deadline.seconds == 90
    assert pb.dispatch_deadline.nanos == 0


def test_schedule_time_of_another_offset_is_the_same_instant() -> None:
    at = datetime(2030, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))

    pb = tasks_v2.Task.pb(make(schedule_at=at))

    assert pb.schedule_time.seconds == int(at.timestamp())


def test_naive_schedule_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make(schedule_at=datetime(2030, 1, 2))


def test_oidc_token_only_with_a_service_account() -> None:
    without = tasks_v2.Task.pb(make(service_account=None))
    with_sa = tasks_v2.Task.pb(make(service_account="tasks@p.iam.gserviceaccount.com"))

    assert not without.http_request.HasField("oidc_token")
    assert with_sa.http_request.HasField("oidc_token")
    assert with_sa.http_request.oidc_token.service_account_email == "tasks@p.iam.gserviceaccount.com"
    assert with_sa.http_request.oidc_token.audience == URL


def test_task_id_is_a_deterministic_hash_of_message_and_generation() -> None:
    assert task_id(MESSAGE, 1) == task_id(MESSAGE, 1)
    assert task_id(MESSAGE, 1) != task_id(MESSAGE, 2)
    assert task_id(MESSAGE, 1) != task_id(uuid.uuid4(), 1)
    assert len(task_id(MESSAGE, 1)) == 40
    int(task_id(MESSAGE, 1), 16)


class StubClient:
    """Answers create_task with the given outcomes, in order (an exception is raised)."""

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    def create_task(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def queue_with(client: StubClient, **kwargs: Any) -> CloudTasksQueue:
    return CloudTasksQueue(client, queue_path=QUEUE, deliver_url=URL, service_account=None, **kwargs)  # type: ignore[arg-type]


NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_already_exists_counts_as_scheduled() -> None:
    client = StubClient(api_exceptions.AlreadyExists("task exists"))

    assert queue_with(client).schedule(MESSAGE, 7, NOW, NOW) == task_name(QUEUE, MESSAGE, 7)


def test_unavailable_is_retried_within_the_timeout() -> None:
    client = StubClient(api_exceptions.ServiceUnavailable("reset"), None)

    assert queue_with(client).schedule(MESSAGE, 7, NOW, NOW) == task_name(QUEUE, MESSAGE, 7)
    assert len(client.calls) == 2
    assert all(0 < call["timeout"] <= 10 for call in client.calls)
    assert all(call["retry"] is None for call in client.calls)


def test_other_api_errors_become_unavailable() -> None:
    client = StubClient(api_exceptions.PermissionDenied("no enqueuer role"))

    with pytest.raises(Unavailable, match="PermissionDenied"):
        queue_with(client).schedule(MESSAGE, 7, NOW, NOW)
    assert len(client.calls) == 1


def test_beyond_the_horizon_nothing_is_created() -> None:
    client = StubClient()

    assert (
        queue_with(client, horizon=timedelta(days=1)).schedule(MESSAGE, 7, NOW + timedelta(days=2), NOW)
        is None
    )
    assert client.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dispatch_deadline": timedelta(seconds=10)},
        {"dispatch_deadline": timedelta(minutes=31)},
        {"horizon": timedelta(days=31)},
        {"timeout": timedelta(0)},
    ],
)
def test_settings_outside_cloud_tasks_limits_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        queue_with(StubClient(), **kwargs)
