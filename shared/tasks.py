"""Cloud Tasks adapter of the TaskQueue port: one named HTTP task per (message, generation).

A task is only a wake-up call for deliver_message; the database row stays the source of truth. The
task name is a hash of (message id, generation), so re-creating the same task is a no-op in Cloud
Tasks (AlreadyExists), and hashed names spread over the key space as Cloud Tasks recommends, where
sequential names would pile onto one shard.

Locally the same client talks to `gcloud-tasks-emulator` (see shared/dev/tasks_emulator.py), which
does not deduplicate names, so there a second create is a second delivery; deliver_message is
idempotent per generation either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import grpc
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.protobuf import duration_pb2, timestamp_pb2

from shared.errors import Unavailable

# google-api-core's long-running-operations package, which the Cloud Tasks client imports but never
# uses, loads its asyncio REST transport whenever google-auth's aiohttp session can be imported,
# and aiohttp is installed here (twilio needs it): about 0.3 s of a cold start. Both places that
# load it treat its absence as the ordinary case (the `async_rest` extra not installed).
_ASYNC_REST_SESSIONS = "google.auth.aio.transport.sessions"


@contextmanager
def _without_async_rest() -> Iterator[None]:
    """While the client is imported, google-auth's aiohttp session is "not installed" (None in
    sys.modules is the import system's own way to say so); afterwards it imports as usual."""
    if _ASYNC_REST_SESSIONS in sys.modules:
        yield  # already loaded by someone else: nothing to save
        return
    sys.modules[_ASYNC_REST_SESSIONS] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(_ASYNC_REST_SESSIONS, ...) is None:
            del sys.modules[_ASYNC_REST_SESSIONS]


with _without_async_rest():
    from google.cloud import tasks_v2
    from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

log = logging.getLogger(__name__)

# Limits of Cloud Tasks itself: schedule_time at most 30 days ahead; an HTTP task's dispatch
# deadline between 15 s and 30 min.
MAX_HORIZON = timedelta(days=30)
MIN_DISPATCH_DEADLINE = timedelta(seconds=15)
MAX_DISPATCH_DEADLINE = timedelta(minutes=30)

DEFAULT_HORIZON = MAX_HORIZON - timedelta(minutes=5)
DEFAULT_DISPATCH_DEADLINE = timedelta(seconds=60)
DEFAULT_TIMEOUT = timedelta(seconds=10)

# 40 hex chars = 160 bits: collisions are out of the question, and the name stays short in logs.
_TASK_ID_HEX_CHARS = 40


def task_id(message_id: uuid.UUID, generation: int) -> str:
    """The task's id within its queue: deterministic per (message, generation), not sequential."""
    return hashlib.sha256(f"{message_id}:{generation}".encode()).hexdigest()[:_TASK_ID_HEX_CHARS]


def task_name(queue_path: str, message_id: uuid.UUID, generation: int) -> str:
    return f"{queue_path}/tasks/{task_id(message_id, generation)}"


def task_body(message_id: uuid.UUID, generation: int) -> bytes:
    return json.dumps({"messageId": str(message_id), "generation": generation}).encode()


def _require_aware(value: datetime, label: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{label} must be timezone-aware, got naive {value.isoformat()}")


def build_task(
    *,
    name: str,
    deliver_url: str,
    message_id: uuid.UUID,
    generation: int,
    schedule_at: datetime,
    service_account: str | None,
    dispatch_deadline: timedelta,
) -> tasks_v2.Task:
    """The Task proto for one delivery attempt; pure, so it can be checked without a server."""
    _require_aware(schedule_at, "schedule_at")
    schedule_time = timestamp_pb2.Timestamp()
    schedule_time.FromDatetime(schedule_at)
    deadline = duration_pb2.Duration()
    deadline.FromTimedelta(dispatch_deadline)

    http_request = tasks_v2.HttpRequest(
        http_method=tasks_v2.HttpMethod.POST,
        url=deliver_url,
        headers={"Content-Type": "application/json"},
        body=task_body(message_id, generation),
    )
    if service_account:
        # Cloud Run / Cloud Functions gen2 check the token's audience against the service URL.
        http_request.oidc_token = tasks_v2.OidcToken(
            service_account_email=service_account, audience=deliver_url
        )
    return tasks_v2.Task(
        name=name,
        http_request=http_request,
        schedule_time=schedule_time,
        dispatch_deadline=deadline,
    )


def build_tasks_client(emulator_host: str | None) -> tasks_v2.CloudTasksClient:
    """A Cloud Tasks client; with `emulator_host` ("host:port") a plaintext one for the emulator.

    Create it once per instance: it owns a gRPC channel.
    """
    if emulator_host:
        channel = grpc.insecure_channel(emulator_host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


class CloudTasksQueue:
    """TaskQueue on Cloud Tasks: HTTP POST {"messageId", "generation"} to deliver_url at `at`."""

    def __init__(
        self,
        client: tasks_v2.CloudTasksClient,
        *,
        queue_path: str,
        deliver_url: str,
        service_account: str | None,
        horizon: timedelta = DEFAULT_HORIZON,
        dispatch_deadline: timedelta = DEFAULT_DISPATCH_DEADLINE,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not queue_path.startswith("projects/") or "/queues/" not in queue_path:
            raise ValueError(f"queue_path must be projects/P/locations/L/queues/Q, got {queue_path!r}")
        if not deliver_url.startswith(("http://", "https://")):
            raise ValueError(f"deliver_url must be an http(s) URL, got {deliver_url!r}")
        if not timedelta(0) < horizon <= MAX_HORIZON:
            raise ValueError(f"horizon must be in (0, {MAX_HORIZON}], got {horizon}")
        if not MIN_DISPATCH_DEADLINE <= dispatch_deadline <= MAX_DISPATCH_DEADLINE:
            raise ValueError(
                f"dispatch_deadline must be in [{MIN_DISPATCH_DEADLINE}, {MAX_DISPATCH_DEADLINE}], "
                f"got {dispatch_deadline}"
            )
        if timeout <= timedelta(0):
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._client = client
        self.queue_path = queue_path
        self.deliver_url = deliver_url
        self.service_account = service_account or None
        self.horizon = horizon
        self.dispatch_deadline = dispatch_deadline
        self.timeout = timeout

    def task_name(self, message_id: uuid.UUID, generation: int) -> str:
        return task_name(self.queue_path, message_id, generation)

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        """Create the task; returns its name, or None when `at` is beyond the queue's horizon.

        Raises shared.errors.Unavailable if the task could not be created within the timeout.
        """
        _require_aware(at, "at")
        _require_aware(now, "now")
        if at - now > self.horizon:
            return None
        name = self.task_name(message_id, generation)
        task = build_task(
            name=name,
            deliver_url=self.deliver_url,
            message_id=message_id,
            generation=generation,
            schedule_at=max(at, now),
            service_account=self.service_account,
            dispatch_deadline=self.dispatch_deadline,
        )
        try:
            self._create(task)
        except api_exceptions.AlreadyExists:
            # Same name, same content: this (message, generation) is already scheduled, or already
            # ran and its name is still reserved. Either way the wake-up is taken care of.
            return name
        except (
            api_exceptions.GoogleAPICallError,
            api_exceptions.RetryError,
            grpc.RpcError,
            auth_exceptions.GoogleAuthError,
        ) as exc:
            raise Unavailable(
                f"could not create the Cloud Task for message {message_id} generation {generation} "
                f"in {self.queue_path}: {type(exc).__name__}: {exc}"
            ) from exc
        return name

    def _create(self, task: tasks_v2.Task) -> None:
        # The name makes create idempotent, so a retry after a lost response is safe (it answers
        # AlreadyExists). gapic's own retry would let the last attempt run past our budget; this
        # loop keeps the whole call, retries included, within self.timeout.
        deadline = time.monotonic() + self.timeout.total_seconds()
        backoff = 0.1
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._client.create_task(
                    parent=self.queue_path, task=task, retry=None, timeout=max(remaining, 0.001)
                )
                return
            except api_exceptions.ServiceUnavailable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= backoff:
                    raise
                log.warning("Cloud Tasks unavailable, retrying in %.1fs: %s", backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
