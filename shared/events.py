"""Pub/Sub adapter of the EventPublisher port: events for agents (message.*) and inbound replies.

The real google-cloud-pubsub client; with PUBSUB_EMULATOR_HOST set it talks to the emulator. The
client is made once per instance; each publish waits for Pub/Sub's ack (bounded), so the caller
knows whether to mark the outbox row published.

The publish's retries are bounded by the same timeout. The client's default retries a publish in a
background thread for up to 10 minutes: after this adapter had reported the failure (so the outbox
publishes the event again on the next drain, and a late success of the first attempt made it a
duplicate), with one such thread per event a drain tried during an outage.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.api_core import exceptions as google_exceptions
from google.api_core import retry as retries
from google.cloud import pubsub_v1  # type: ignore[attr-defined]

from shared.errors import Unavailable

# The errors the client's own default retries a publish on (google.pubsub_v1's transport).
_RETRYABLE = retries.if_exception_type(
    google_exceptions.Aborted,
    google_exceptions.Cancelled,
    google_exceptions.DeadlineExceeded,
    google_exceptions.InternalServerError,
    google_exceptions.ResourceExhausted,
    google_exceptions.ServiceUnavailable,
    google_exceptions.Unknown,
)


class PubSubPublisher:
    def __init__(
        self,
        client: pubsub_v1.PublisherClient,
        *,
        project: str,
        topics: Mapping[str, str],
        timeout_seconds: float = 10.0,
    ) -> None:
        self._client = client
        self._paths = {logical: client.topic_path(project, name) for logical, name in topics.items()}
        self._timeout = timeout_seconds
        self._retry = retries.Retry(
            predicate=_RETRYABLE, initial=0.1, maximum=timeout_seconds, multiplier=4, timeout=timeout_seconds
        )

    def publish(
        self, topic: str, data: bytes, attributes: dict[str, str], *, timeout: float | None = None
    ) -> str:
        path = self._paths.get(topic)
        if path is None:
            raise Unavailable(f"no Pub/Sub topic configured for {topic!r} events")
        # A caller's shorter bound (a webhook's drain budget) bounds the retries too, so none runs on
        # in the background after the caller was told it failed.
        limit = self._timeout if timeout is None else max(0.001, min(timeout, self._timeout))
        retry = self._retry if limit == self._timeout else self._retry.with_timeout(limit)
        try:
            future = self._client.publish(path, data, retry=retry, timeout=limit, **attributes)
            return str(future.result(timeout=limit))
        except (google_exceptions.GoogleAPIError, TimeoutError, OSError) as exc:
            raise Unavailable(f"publishing to {path} failed: {type(exc).__name__}") from exc
        except Exception as exc:  # concurrent.futures errors and grpc's own; the outbox retries
            raise Unavailable(f"publishing to {path} failed: {type(exc).__name__}") from exc


def build_publisher(project: str, topics: Mapping[str, str]) -> PubSubPublisher:
    return PubSubPublisher(pubsub_v1.PublisherClient(), project=project, topics=topics)
