"""What both renderers share: the text helpers and the Renderer contract's common steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from shared.models import DEFAULT_STYLE, STYLES, Relevance, Rendered, Turn, Usage

# "…" is one character where "..." is three; note it is not in the GSM-7 alphabet, so an SMS that
# ends in it is sent as UCS-2 (70 characters a segment instead of 160).
ELLIPSIS = "…"
# No model was called: the message already had its final `content`.
PASSTHROUGH_MODEL = "none"


def truncate(text: str, max_length: int) -> str:
    """`text` if it fits in `max_length` characters, else cut at a word boundary and ended with "…"."""
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    if len(text) <= max_length:
        return text
    room = max_length - len(ELLIPSIS)
    cut = text[:room]
    if not text[room].isspace():
        boundary = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        # Past the middle only: a single very long word is better cut than reduced to a stub.
        if boundary >= room // 2:
            cut = cut[:boundary]
    cut = trim_end(cut)
    if not cut:
        cut = text[:room].strip()
    return cut + ELLIPSIS


def trim_end(text: str) -> str:
    """`text` without the punctuation that would stand before an ellipsis: "word,…" or "word -…"
    reads as broken; "word…" does not."""
    return text.rstrip().rstrip(",;:.!?-–—(").rstrip()


def aware(moment: datetime) -> datetime:
    # A naive time from a caller is taken as UTC rather than failing the comparison with an aware one.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def looks_like_json(text: str) -> bool:
    return text.startswith(("{", "["))


def _style(message_data: Mapping[str, Any]) -> str:
    style = message_data.get("style")
    return style if isinstance(style, str) and style in STYLES else DEFAULT_STYLE


def _passthrough(message_data: Mapping[str, Any], max_length: int) -> Rendered | None:
    content = message_data.get("content")
    if isinstance(content, str) and content.strip():
        return Rendered(truncate(content.strip(), max_length), Usage(model=PASSTHROUGH_MODEL))
    return None


class StructuredRenderer(ABC):
    """The Renderer port's steps both renderers take: `max_length` checked, a finished `content`
    passed through (truncated) without writing anything, the style read (an unknown one is the
    default), and a naive `queued_at` read as UTC. Subclasses write and judge."""

    def render(
        self, message_data: Mapping[str, Any], *, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        passthrough = _passthrough(message_data, max_length)
        if passthrough is not None:
            return passthrough
        return self._write(message_data, _style(message_data), conversation, max_length)

    def judge_relevance(
        self,
        text: str,
        message_data: Mapping[str, Any],
        *,
        conversation: Sequence[Turn],
        queued_at: datetime,
    ) -> Relevance:
        return self._judge(text, message_data, conversation, aware(queued_at))

    @abstractmethod
    def _write(
        self, message_data: Mapping[str, Any], style: str, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        """The SMS text for structured `message_data` (no `content`), in `style` (a known one)."""

    @abstractmethod
    def _judge(
        self, text: str, message_data: Mapping[str, Any], conversation: Sequence[Turn], queued: datetime
    ) -> Relevance:
        """Whether `text`, queued at `queued` (aware), is still worth sending after `conversation`."""
