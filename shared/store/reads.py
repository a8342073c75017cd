"""The Store's reads for operators and agents looking at a user's queue, over the same driver call
as shared/store/store.py (kept apart so that module stays small)."""

from __future__ import annotations

import uuid
from typing import Any

from shared.domain import StoredMessage
from shared.models import MessageFilter
from shared.store import decode


class QueueReads:
    """Mixed into SqlStore, whose `call` runs one SQL function."""

    def call(self, function: str, /, **args: Any) -> Any:
        raise NotImplementedError

    def list_messages(
        self, user_id: uuid.UUID, limit: int, which: MessageFilter
    ) -> list[StoredMessage] | None:
        before_at, before_id = which.before or (None, None)
        doc = self.call(
            "mq_list_messages",
            user_id=user_id,
            limit=limit,
            agent_ids=None if which.agent_ids is None else sorted(which.agent_ids),
            status=which.status,
            agent_id=which.agent_id,
            topic_key=which.topic_key,
            before_created_at=before_at,
            before_id=before_id,
        )
        return None if doc is None else [decode.message(m) for m in doc.get("messages") or []]
