"""Conversations: Twilio's webhooks (an SMS from a user, a delivery receipt) and the event outbox
that tells agents about them."""

from __future__ import annotations

import json
import logging
import time as _time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from shared import compliance
from shared.errors import Unavailable
from shared.log import event
from shared.ports import EventPublisher, Store
from shared.service.common import Clock, log
from shared.twilio_forms import InboundSms, StatusCallback, reply_keyword


def inbound(form: dict[str, str], *, store: Store, now: datetime) -> dict[str, Any]:
    """An SMS from a user: recorded once per MessageSid; an opt-out keyword or revocation phrase
    opts them out (and cancels what is queued for them), an opt-in keyword back in, each with its
    consent ledger row; the inbound_message event, raw text included, goes to the outbox. The
    answer carries `keyword` (stop/start/help or None) even for a repeated webhook, so the same
    reply can be given again."""
    sms = InboundSms.parse(form)
    reply = reply_keyword(sms.body)
    word = reply.keyword if reply else None
    result = store.inbound(
        sms.from_number,
        sms.body,
        sms.sid,
        keyword=word,
        source=reply.source if reply else None,
        num_media=sms.num_media,
        now=now,
    )
    derived = compliance.timezone_for(sms.from_number)
    if derived and result.get("userId") and not result.get("duplicate"):
        # A user created by this SMS has no timezone yet: the number's, if it names one zone.
        store.set_timezone(
            uuid.UUID(str(result["userId"])), derived, source="phone_number", now=now, only_if_unknown=True
        )
    event(
        log,
        logging.INFO,
        "inbound: duplicate webhook ignored"
        if result.get("duplicate")
        else f"inbound: recorded ({word or 'message'})",
        userId=result.get("userId"),
        twilioMessageSid=sms.sid,
        reason=word,
        source=reply.source if reply else None,
        cancelled=result.get("cancelled"),
        optedOut=result.get("optedOut"),
    )
    return result | {"keyword": word}


def status_callback(form: dict[str, str], *, store: Store, now: datetime) -> dict[str, Any]:
    """Twilio's delivery receipt: the outbound message's status moves forward, never back."""
    cb = StatusCallback.parse(form)
    result = store.status_callback(cb.sid, cb.status, cb.error_code, now)
    if not result.get("known"):
        event(
            log,
            logging.WARNING,
            "status callback for an unknown sid",
            twilioMessageSid=cb.sid,
            reason=cb.status,
        )
    else:
        event(
            log,
            logging.INFO,
            f"status callback: {cb.status}" + ("" if result.get("changed") else " (no change)"),
            twilioMessageSid=cb.sid,
            reason=cb.status,
            errorCode=cb.error_code,
            cancelled=result.get("cancelled"),
        )
    return result


class Drained(NamedTuple):
    """What one drain did: events published, failed for Pub/Sub's sake (`stopped` then: the rest
    was not tried), isolated (the event itself made its publish raise: marked failed with its error,
    the drain went on), and whether the drain stopped early (a publish failure or the time budget)."""

    published: int
    failed: int
    isolated: int = 0
    stopped: bool = False


def drain_events(
    *,
    store: Store,
    publisher: EventPublisher | None,
    clock: Clock,
    limit: int = 100,
    lease_seconds: int = 30,
    budget_seconds: float | None = None,
    monotonic: Callable[[], float] = _time.monotonic,
) -> Drained:
    """Publish what waits in the outbox. A failure leaves the event for the next drain (the sweep
    drains every minute), so Pub/Sub trouble never loses or blocks anything.

    The drain stops at the first publish failure: in an outage every publish waits out its timeout,
    so trying each event would hold the caller (a Twilio webhook) for the timeout times the batch.
    `budget_seconds` bounds the whole drain (measured with `monotonic`): each publish may wait only
    what is left of it, and none starts once it is spent. What was not tried keeps its lease and is
    drained by a later drain once the lease ends."""
    if publisher is None:
        return Drained(0, 0)
    deadline = None if budget_seconds is None else monotonic() + budget_seconds
    pending = store.events_pending(limit, lease_seconds=lease_seconds, now=clock())
    done: list[int] = []
    failed: list[int] = []
    bad: list[tuple[int, str]] = []
    error = ""
    stopped = False
    for e in pending:
        timeout = None if deadline is None else deadline - monotonic()
        if timeout is not None and timeout <= 0:
            stopped = True
            break
        try:
            data = json.dumps({"eventType": e.event_type, **e.payload}, default=str).encode()
            publisher.publish(e.topic, data, e.attributes, timeout=timeout)
        except Unavailable as exc:
            failed.append(e.id)
            error = exc.message
            stopped = True
            break
        except Exception as exc:
            # This event's own fault (its data or attributes), not Pub/Sub's: the others go on.
            bad.append((e.id, f"{type(exc).__name__}: {exc}"))
            continue
        done.append(e.id)
    _settle(store, clock, done, failed, error, bad, untried=len(pending) - len(done) - len(failed) - len(bad))
    if stopped and not failed:
        event(
            log,
            logging.INFO,
            "events: drain time budget spent; the rest is kept for the next drain",
            untried=len(pending) - len(done) - len(bad),
        )
    return Drained(len(done), len(failed), len(bad), stopped)


def _settle(
    store: Store,
    clock: Clock,
    done: list[int],
    failed: list[int],
    error: str,
    bad: list[tuple[int, str]],
    *,
    untried: int,
) -> None:
    """A drain's results into the outbox: published, failed with Pub/Sub's error, or each bad
    event failed with its own."""
    if done:
        store.events_published(done, clock())
    if failed:
        store.events_failed(failed, error, clock())
        event(
            log,
            logging.WARNING,
            "events: publish failed; the rest is kept for the next drain",
            failed=len(failed),
            untried=untried,
            error=error,
        )
    for event_id, why in bad:
        store.events_failed([event_id], why, clock())
        event(log, logging.ERROR, "events: an event could not be published", eventId=event_id, error=why)
