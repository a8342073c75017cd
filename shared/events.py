"""Pub/Sub adapter of the EventPublisher port: events for agents (message.*) and inbound replies.

The real google-cloud-pubsub client; with PUBSUB_EMULATOR_HOST set it talks to the emulator. The
client is made once per instance; each publish waits for Pub/Sub's ack (bounded), so the caller
knows whether to mark the outbox row published.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1  # type: ignore[attr-defined]

from shared.errors import Unavailable


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

    def publish(self, topic: str, data: bytes, attributes: dict[str, str]) -> str:
        path = self._paths.get(topic)
        if path is None:
            raise Unavailable(f"no Pub/Sub topic configured for {topic!r} events")
        try:
            future = self._client.publish(path, data, **attributes)
            return str(future.result(timeout=self._timeout))
        except (google_exceptions.GoogleAPIError, TimeoutError, OSError) as exc:
            raise Unavailable(f"publishing to {path} failed: {type(exc).__name__}") from exc
        except Exception as exc:  # concurrent.futures errors and grpc's own; the outbox retries
            raise Unavailable(f"publishing to {path} failed: {type(exc).__name__}") from exc


def build_publisher(project: str, topics: Mapping[str, str]) -> PubSubPublisher:
    return PubSubPublisher(pubsub_v1.PublisherClient(), project=project, topics=topics)
