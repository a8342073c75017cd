"""The deterministic template renderer: text from `type`, `style` and the fields, without a model."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from shared.models import Relevance, Rendered, Turn, Usage
from shared.render.text import StructuredRenderer, aware, truncate

TEMPLATE_MODEL = "template"

STYLE_PREFIX = {
    "supportive": "Good news! ",
    "snarky": "Well, well. ",
    "chaotic": "PLOT TWIST! ",
    "neutral": "",
}
STYLE_SUFFIX = {
    "supportive": " You've got this.",
    "snarky": " Try to act surprised.",
    "chaotic": " Buckle up!",
    "neutral": "",
}
# Per type, the first template whose placeholders are all present wins; fields it does not use are
# appended as "Key: value", so nothing the agent sent is silently dropped.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "intro_match": (
        "You've been matched with {name} at {venue}.",
        "You've been matched with {name}.",
    ),
    "reminder": ("Reminder: {what} at {when}.", "Reminder: {what}."),
    "event_update": ("Update on {event}: {update}.",),
}


# The verdict says why without a model: the agent reads it in `superseded_reason` and the
# message.superseded event, and an operator must not mistake it for a model's judgement.
NO_MODEL_STALE = "the user wrote since it was queued, and no model (ANTHROPIC_API_KEY unset) could judge it"


class TemplateRenderer(StructuredRenderer):
    """Deterministic text from `type`, `style` and the fields: no network, no key, no cost.

    Used when ANTHROPIC_API_KEY is unset (local stack, tests), or as a fallback when Claude is
    permanently unavailable. The same input always gives the same text.

    A queued message is relevant unless the user wrote after it was queued. Conservative: any reply
    may have made the message stale, and without a model we cannot tell which, so holding it back
    is preferred to sending something out of place.
    """

    def _write(
        self, message_data: Mapping[str, Any], style: str, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        kind = message_data.get("type")
        kind = kind if isinstance(kind, str) else ""
        fields = {k: v for k, v in message_data.items() if k not in ("type", "style", "content")}
        body = _fill(kind, fields)
        text = f"{STYLE_PREFIX[style]}{body}{STYLE_SUFFIX[style]}".strip()
        # A template may open with a field, and field values are the agent's: never let it read as JSON.
        text = text.lstrip("{[ ").strip() or "You have a new message."
        return Rendered(truncate(text, max_length), Usage(model=TEMPLATE_MODEL))

    def _judge(
        self, text: str, message_data: Mapping[str, Any], conversation: Sequence[Turn], queued: datetime
    ) -> Relevance:
        if any(t.direction == "inbound" and aware(t.at) > queued for t in conversation):
            return Relevance(False, NO_MODEL_STALE, Usage(model=TEMPLATE_MODEL))
        return Relevance(True, "the user has not written since it was queued", Usage(model=TEMPLATE_MODEL))


def _fill(kind: str, fields: Mapping[str, Any]) -> str:
    present = {k: _value(v) for k, v in fields.items() if _value(v)}
    for template in TEMPLATES.get(kind, ()):
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        if names.issubset(present):
            rest = _pairs({k: v for k, v in present.items() if k not in names})
            return template.format_map(present) + (f" {rest}." if rest else "")
    pairs = _pairs(present)
    title = _humanise(kind) or "Update"
    return f"{title}: {pairs}." if pairs else f"{title}."


def _pairs(values: Mapping[str, str]) -> str:
    return "; ".join(f"{_humanise(k)}: {values[k]}" for k in sorted(values))


def _humanise(key: str) -> str:
    """ "venueName" / "venue_name" → "Venue name"."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", key)
    words = re.sub(r"[^0-9A-Za-z]+", " ", words).strip().lower()
    return words[:1].upper() + words[1:]


def _value(value: Any) -> str:
    """A field value as words, never as JSON: lists joined, objects as "key value" pairs."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Mapping):
        return _joined(f"{_humanise(str(k)).lower()} {v}" for k, v in _entries(value))
    if isinstance(value, list | tuple):
        return _joined(_value(v) for v in value)
    return str(value)


def _entries(mapping: Mapping[Any, Any]) -> Iterable[tuple[Any, str]]:
    """A mapping's keys (sorted as strings) with their values as words, the empty ones left out."""
    for k, v in sorted(mapping.items(), key=str):
        words = _value(v)
        if words:
            yield k, words


def _joined(words: Iterable[str]) -> str:
    return ", ".join(w for w in words if w)
