"""Each agent type reads its own events subscription, filtered on the `agentId` attribute
(infra/terraform/pubsub.tf): so every event about a message must carry its agent's id, or it reaches
no agent. Real Postgres; the events as the outbox holds them for publishing."""

from __future__ import annotations

import uuid

from shared.store.postgres import PostgresStore
from tests.support.constants import POLICY, T0
from tests.support.factories import make_user, schedule, sql
from tests.support.fakes import RecordingTaskQueue


def test_every_message_event_carries_its_agent_id(
    store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    user = make_user(store)
    failed = schedule(store, tasks, user, T0, policy=POLICY, agentId="agent_fail").message.id
    unrenderable = schedule(
        store, tasks, user, T0, policy=POLICY, agentId="agent_render", topicKey="t"
    ).message.id
    cancelled = schedule(store, tasks, user, T0, policy=POLICY, agentId="agent_cancel").message.id
    assert store.fail(failed, error="21211 invalid number", reason="twilio_rejected", now=T0)
    store.render_failed(unrenderable, error="model down", usage={}, max_attempts=1, now=T0)
    store.cancel(cancelled, agent_id=None, reason="done", now=T0)

    events = sql(
        database_url,
        "select event_type, payload->>'messageId', attributes->>'agentId' from events_outbox"
        " where payload ? 'messageId' order by id",
    )
    agents = {uuid.UUID(str(m)): a for _, m, a in events}
    assert {e for e, _, _ in events} >= {"message.failed", "message.cancelled"}
    assert agents == {failed: "agent_fail", unrenderable: "agent_render", cancelled: "agent_cancel"}
    assert all(agent for _, _, agent in events)


def test_an_event_about_no_message_is_left_as_it_was(store: PostgresStore, database_url: str) -> None:
    user = make_user(store)
    sql(
        database_url,
        "select mq_emit('inbound', 'inbound_message', %s::jsonb, %s::jsonb, %s)",
        f'{{"userId": "{user}"}}',
        f'{{"userId": "{user}", "agentType": "concierge"}}',
        T0,
    )
    [(attributes,)] = sql(database_url, "select attributes from events_outbox")
    assert attributes == {"userId": str(user), "agentType": "concierge", "eventType": "inbound_message"}
