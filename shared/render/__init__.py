"""Anthropic (Claude) adapter of the Renderer port, and a deterministic template renderer beside it.

An agent may schedule structured messageData (`{"type": "intro_match", "style": "snarky", "name": ...}`)
instead of a finished `content` string; the deliver step then asks a Renderer for the SMS text, and may
ask whether a queued message is still relevant given what was said since it was queued.

Anthropic's exceptions stop here: callers only ever see RenderUnavailable. Its `permanent` attribute
tells the two kinds apart:

- `permanent=False` (timeouts, dropped connections, 408/409/429/5xx: what the SDK itself would retry,
  and answers we refuse to send such as raw JSON or nothing): try again later; the queue's backoff and
  MAX_ATTEMPTS bound it. The client is built with `max_retries=0` so that no retry hides inside a call.
- `permanent=True` (401/403, 400 and other 4xx, a refusal): the same request will fail the same way
  until configuration or the message changes, so the caller may fail fast, or fall back to the
  TemplateRenderer, instead of burning its attempts.

The TemplateRenderer needs no network and no key: it is used when ANTHROPIC_API_KEY is unset.

The modules: `text` (truncation and the steps both renderers share), `template` (TemplateRenderer),
`prompt` (what Claude is told and the cleaning of its answers), `claude` (ClaudeRenderer, its
errors, usage and cost). Import the names from `shared.render`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shared.domain import needs_render
from shared.errors import RenderUnavailable
from shared.models import (
    MAX_STRUCTURED_SIZE,
    MAX_TYPE_LENGTH,
    STYLES,
    Relevance,
    Rendered,
    Turn,
    Usage,
    validate_structured,
)
from shared.ports import Renderer
from shared.render.prompt import (
    MAX_TURN_CHARS,
    MAX_TURNS,
    RELEVANCE_TOOL,
    RELEVANCE_TOOL_NAME,
    STYLE_GUIDE,
    SYSTEM_PROMPT,
)
from shared.render.template import STYLE_PREFIX, STYLE_SUFFIX, TEMPLATE_MODEL, TEMPLATES, TemplateRenderer
from shared.render.text import ELLIPSIS, PASSTHROUGH_MODEL, truncate

if TYPE_CHECKING:
    from shared.render.claude import (
        CACHE_READ_FACTOR,
        CACHE_WRITE_FACTOR,
        MAX_REASON_LENGTH,
        PRICES,
        ClaudeRenderer,
        estimate_cost,
    )

# shared.render.claude imports the anthropic SDK, over a second of a cold instance: its names are
# loaded when first asked for, so the TemplateRenderer (no ANTHROPIC_API_KEY) never pays for it.
_CLAUDE_NAMES = frozenset(
    {
        "CACHE_READ_FACTOR",
        "CACHE_WRITE_FACTOR",
        "MAX_REASON_LENGTH",
        "PRICES",
        "ClaudeRenderer",
        "estimate_cost",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CLAUDE_NAMES:
        value = getattr(importlib.import_module("shared.render.claude"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CACHE_READ_FACTOR",
    "CACHE_WRITE_FACTOR",
    "ELLIPSIS",
    "MAX_REASON_LENGTH",
    "MAX_STRUCTURED_SIZE",
    "MAX_TURNS",
    "MAX_TURN_CHARS",
    "MAX_TYPE_LENGTH",
    "PASSTHROUGH_MODEL",
    "PRICES",
    "RELEVANCE_TOOL",
    "RELEVANCE_TOOL_NAME",
    "STYLES",
    "STYLE_GUIDE",
    "STYLE_PREFIX",
    "STYLE_SUFFIX",
    "SYSTEM_PROMPT",
    "TEMPLATES",
    "TEMPLATE_MODEL",
    "ClaudeRenderer",
    "Relevance",
    "RenderUnavailable",
    "Rendered",
    "Renderer",
    "TemplateRenderer",
    "Turn",
    "Usage",
    "estimate_cost",
    "needs_render",
    "truncate",
    "validate_structured",
]
