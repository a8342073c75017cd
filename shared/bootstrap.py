"""Builds the real adapters from Settings, once per instance (Cloud Functions reuse an instance
across requests, so clients and connection pools are created on first use and kept).

Tests install a Container of their own with `install()`: a real store on a test database, and
in-process stand-ins only for what leaves the machine.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from shared.config import Settings
from shared.domain import Policy
from shared.errors import OrchestratorError
from shared.models import Relevance, Rendered, Turn
from shared.ports import EventPublisher, Renderer, SmsSender, Store, TaskQueue

T = TypeVar("T")


class ConfigurationError(OrchestratorError):
    """The function is not configured: a required environment variable is missing."""

    http_status = 500
    code = "misconfigured"


def utc_now() -> datetime:
    return datetime.now(UTC)


class Container:
    """The adapters of one instance. Each is built on first use, so a function only needs the
    configuration of the ports it uses (schedule_message needs no Twilio credentials)."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        tasks: TaskQueue | None = None,
        sms: SmsSender | None = None,
        events: EventPublisher | None = None,
        renderer: Renderer | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic  # elapsed time, for time budgets (the virtual clock stands still)
        given = {"store": store, "tasks": tasks, "sms": sms, "events": events, "renderer": renderer}
        self._ports: dict[str, Any] = {name: port for name, port in given.items() if port is not None}
        self._lock = threading.Lock()

    def _port(self, name: str, build: Callable[[Settings], T]) -> T:
        """The port `name`, built from the settings on first use (once, whichever thread asks)."""
        if name not in self._ports:
            with self._lock:
                if name not in self._ports:
                    self._ports[name] = build(self.settings)
        port: T = self._ports[name]
        return port

    @property
    def policy(self) -> Policy:
        return self.settings.policy

    @property
    def store(self) -> Store:
        return self._port("store", build_store)

    @property
    def tasks(self) -> TaskQueue:
        """The Cloud Tasks client is built on the first task created, not here: a delivery that
        schedules no follow-up needs none, and importing google.cloud.tasks_v2 costs a cold
        instance over half a second."""
        return self._port("tasks", lambda settings: LazyTaskQueue(settings))

    @property
    def events(self) -> EventPublisher | None:
        """None when no topic is configured: events then wait in the outbox."""
        return self._port("events", build_events)

    @property
    def renderer(self) -> Renderer:
        """Built on the first model call, not here: most deliveries render nothing, and importing
        the anthropic client costs a cold instance about a second."""
        return self._port("renderer", lambda settings: LazyRenderer(lambda: build_renderer(settings)))

    @property
    def sms(self) -> SmsSender:
        return self._port("sms", build_sms)


def build_store(settings: Settings) -> Store:
    if settings.database_url:
        from shared.store.postgres import PostgresStore

        return PostgresStore(settings.database_url, max_size=settings.db_pool_max)
    if settings.supabase_url and settings.supabase_service_key:
        from shared.store.supabase import SupabaseStore

        return SupabaseStore.connect(settings.supabase_url, settings.supabase_service_key)
    raise ConfigurationError("set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_KEY")


def build_tasks(settings: Settings) -> TaskQueue:
    deliver_url = _deliver_url(settings)
    from shared.tasks import CloudTasksQueue, build_tasks_client

    return CloudTasksQueue(
        build_tasks_client(settings.cloud_tasks_emulator_host),
        queue_path=settings.tasks_queue_path,
        deliver_url=deliver_url,
        service_account=settings.tasks_service_account,
    )


def _deliver_url(settings: Settings) -> str:
    if not settings.deliver_url:
        raise ConfigurationError("set DELIVER_URL to the deliver_message function's URL")
    return settings.deliver_url


class LazyTaskQueue:
    """A TaskQueue that builds the real one (build_tasks) when the first task is created. The
    configuration is checked at once, so a function without DELIVER_URL fails as early as before."""

    def __init__(self, settings: Settings, build: Callable[[Settings], TaskQueue] = build_tasks) -> None:
        _deliver_url(settings)
        self._settings = settings
        self._build = build
        self._real: TaskQueue | None = None
        self._lock = threading.Lock()

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        if self._real is None:
            with self._lock:
                if self._real is None:
                    self._real = self._build(self._settings)
        return self._real.schedule(message_id, generation, at, now)


def build_events(settings: Settings) -> EventPublisher | None:
    topics = {k: v for k, v in (("events", settings.events_topic), ("inbound", settings.inbound_topic)) if v}
    if not topics:
        return None
    from shared.events import build_publisher

    return build_publisher(settings.google_cloud_project, topics)


class LazyRenderer:
    """A Renderer that builds the real one when it is first asked for something."""

    def __init__(self, build: Callable[[], Renderer]) -> None:
        self._build = build
        self._real: Renderer | None = None
        self._lock = threading.Lock()

    def _get(self) -> Renderer:
        if self._real is None:
            with self._lock:
                if self._real is None:
                    self._real = self._build()
        return self._real

    def render(
        self, message_data: Mapping[str, Any], *, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        return self._get().render(message_data, conversation=conversation, max_length=max_length)

    def judge_relevance(
        self,
        text: str,
        message_data: Mapping[str, Any],
        *,
        conversation: Sequence[Turn],
        queued_at: datetime,
    ) -> Relevance:
        return self._get().judge_relevance(text, message_data, conversation=conversation, queued_at=queued_at)


def build_renderer(settings: Settings) -> Renderer:
    """Claude when ANTHROPIC_API_KEY is set; otherwise the deterministic template renderer."""
    if not settings.anthropic_api_key:
        from shared.render import TemplateRenderer

        return TemplateRenderer()
    from shared.render import ClaudeRenderer

    return ClaudeRenderer(
        api_key=settings.anthropic_api_key,
        model=settings.anthropic_model,
        base_url=settings.anthropic_base_url,
        timeout_seconds=float(settings.anthropic_timeout_seconds),
    )


def build_sms(settings: Settings) -> SmsSender:
    from shared.sms import TwilioSender, build_twilio_client

    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        raise ConfigurationError("set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
    if not (settings.twilio_phone_number or settings.twilio_messaging_service_sid):
        raise ConfigurationError("set TWILIO_PHONE_NUMBER or TWILIO_MESSAGING_SERVICE_SID")
    client = build_twilio_client(
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        base_url=settings.twilio_api_base_url,
        timeout_seconds=settings.twilio_timeout_seconds,
    )
    return TwilioSender(
        client,
        from_number=None if settings.twilio_messaging_service_sid else settings.twilio_phone_number,
        messaging_service_sid=settings.twilio_messaging_service_sid,
        status_callback=settings.status_callback_url,
    )


_container: Container | None = None
_container_lock = threading.Lock()


def container() -> Container:
    """The instance's Container, built from the environment on first use."""
    global _container
    if _container is None:
        with _container_lock:
            if _container is None:
                from shared import log

                settings = Settings.from_env()
                log.configure(settings.log_level)
                _container = Container(settings)
    return _container


def install(new: Container | None) -> Container | None:
    """Replace the instance's Container (tests); returns the previous one."""
    global _container
    previous, _container = _container, new
    return previous
