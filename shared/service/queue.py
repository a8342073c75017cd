"""A user's queue: the messages of one user, newest first, as the caller may see them (its own
agents' messages; every agent's for an operator)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.domain import StoredMessage
from shared.errors import NotFound
from shared.identity import ANYONE, Caller
from shared.models import MessageFilter
from shared.ports import Store
from shared.small_requests import Cursor, ListQuery


@dataclass(frozen=True)
class MessagePage:
    user_id: str
    messages: tuple[StoredMessage, ...]
    next_cursor: str | None  # None: this is the last page


def list_messages(
    user_id: str, query: Mapping[str, str], *, store: Store, caller: Caller = ANYONE
) -> MessagePage:
    """One page of a user's messages. A caller bound to some agent ids sees only theirs: filtered
    in the database, so a page is never short because of someone else's rows, and a caller with no
    agent of the user's messages (or filtering by an agent it may not act as) gets an empty page."""
    request = ListQuery.parse(user_id, query)
    after = request.after
    which = MessageFilter(
        agent_ids=caller.agent_ids,
        status=request.status,
        agent_id=request.agent_id,
        topic_key=request.topic_key,
        before=None if after is None else (after.created_at, after.message_id),
    )
    # One row more than the page: whether a next page exists, without a count.
    rows = store.list_messages(request.user_id, request.limit + 1, which)
    if rows is None:
        raise NotFound(f"no user with id {request.user_id}", field="userId")
    page = rows[: request.limit]
    last = page[-1] if len(rows) > request.limit else None
    cursor = None
    if last is not None:
        assert last.created_at is not None  # every stored row has one
        cursor = Cursor(last.created_at, last.id).encode()
    return MessagePage(user_id=str(request.user_id), messages=tuple(page), next_cursor=cursor)
