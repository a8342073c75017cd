"""Use cases, one module per job; ports come in as arguments (cosmicpython style) and nothing here
knows about HTTP, psycopg, gRPC or Twilio's client.

- schedule: schedule a message, get one, cancel one
- deliver: the gate one Cloud Task runs (re-check → decide → claim → send → record)
- content: rendering and the relevance check before a claim
- send: single and sequence sends, one error path
- reconcile: stale claims settled with Twilio's record, one requeue path
- sweep: the minute sweep, task creation, health
- conversations: Twilio's webhooks and the event outbox
- consent: an operator's read of a user's consent ledger
- queue: a user's messages, newest first, as the caller may see them

Each name below is imported from its module on first use (PEP 562), not with this package: every
function's instance imports it, and a cold start should only pay for the use cases its function
runs (schedule_message never loads the deliver, sweep or webhook modules).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.domain import Policy
    from shared.service.common import Clock
    from shared.service.consent import consent_history
    from shared.service.conversations import drain_events, inbound, status_callback
    from shared.service.deliver import deliver
    from shared.service.queue import MessagePage, list_messages
    from shared.service.reconcile import reconcile
    from shared.service.schedule import ScheduleResult, cancel, get_message, schedule, schedule_request
    from shared.service.sweep import HealthReport, health, sweep
    from shared.small_requests import parse_task

_HOME = {
    "Policy": "shared.domain",
    "Clock": "shared.service.common",
    "consent_history": "shared.service.consent",
    "drain_events": "shared.service.conversations",
    "inbound": "shared.service.conversations",
    "status_callback": "shared.service.conversations",
    "deliver": "shared.service.deliver",
    "MessagePage": "shared.service.queue",
    "list_messages": "shared.service.queue",
    "reconcile": "shared.service.reconcile",
    "ScheduleResult": "shared.service.schedule",
    "cancel": "shared.service.schedule",
    "get_message": "shared.service.schedule",
    "schedule": "shared.service.schedule",
    "schedule_request": "shared.service.schedule",
    "HealthReport": "shared.service.sweep",
    "health": "shared.service.sweep",
    "sweep": "shared.service.sweep",
    "parse_task": "shared.small_requests",
}

__all__ = [
    "Clock",
    "HealthReport",
    "MessagePage",
    "Policy",
    "ScheduleResult",
    "cancel",
    "consent_history",
    "deliver",
    "drain_events",
    "get_message",
    "health",
    "inbound",
    "list_messages",
    "parse_task",
    "reconcile",
    "schedule",
    "schedule_request",
    "status_callback",
    "sweep",
]


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds each submodule it loads on this package, under the submodule's
        # name; four share it with the use case they hold (deliver, schedule, sweep, reconcile),
        # and whichever module loads one first (deliver.py imports reconcile) must not turn
        # `service.reconcile` into a module.
        if isinstance(value, types.ModuleType) and _HOME.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
