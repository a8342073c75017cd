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
"""

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
