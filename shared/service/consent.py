"""Consent: an operator's read of a user's consent ledger (consent_events). The ledger itself is
written by the SQL functions that change consent (an inbound keyword or phrase, Twilio's 21610 on a
send), in the transaction of the change."""

from __future__ import annotations

from collections.abc import Mapping

from shared.errors import ForbiddenAgent, NotFound
from shared.identity import ANY_AGENT, Caller
from shared.models import ConsentHistory
from shared.ports import Store
from shared.small_requests import ConsentQuery


def consent_history(
    user_id: str, query: Mapping[str, str], *, store: Store, caller: Caller
) -> ConsentHistory:
    """A user's consent history, newest first, for a caller who may act as any agent (an operator,
    or CALLER_IDENTITY=none): the history spans every agent, so an agent bound to some agent ids
    gets ForbiddenAgent, before anything is parsed or read (it learns nothing, not even whether
    the user exists)."""
    if not caller.may_act_as(ANY_AGENT):
        raise ForbiddenAgent(
            f"{caller.identity or 'this caller'} may not read consent history: only an operator "
            f"(an identity that may act as any agent, {ANY_AGENT!r} in AGENT_IDENTITIES) may",
            agentId=ANY_AGENT,
        )
    request = ConsentQuery.parse(user_id, query)
    history = store.consent_history(request.user_id, request.limit)
    if history is None:
        raise NotFound(f"no user with id {request.user_id}", field="userId")
    return history
