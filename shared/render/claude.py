"""The Anthropic (Claude) adapter of the Renderer port: Messages API calls, their errors, usage and cost.

Anthropic's exceptions stop here: callers only ever see RenderUnavailable (see shared.render).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import anthropic
from anthropic.types import Message, MessageParam, TextBlock, TextBlockParam, ToolUseBlock

from shared.errors import RenderUnavailable
from shared.log import event
from shared.models import Relevance, Rendered, Turn, Usage
from shared.render.prompt import (
    RELEVANCE_TOOL,
    RELEVANCE_TOOL_NAME,
    SYSTEM_PROMPT,
    clean,
    relevance_prompt,
    render_prompt,
)
from shared.render.text import ELLIPSIS, StructuredRenderer, looks_like_json, trim_end, truncate

# The package's name, as before the split into modules: log filters and tests select "shared.render".
log = logging.getLogger("shared.render")

MAX_REASON_LENGTH = 200

# USD per million tokens (input, output), from anthropic.com/pricing (late 2025). Cache writes (5-minute
# TTL) bill 1.25x input and cache reads 0.1x input. The longest prefix of the model name wins, so dated
# snapshots ("claude-sonnet-4-5-20250929") price like their alias; a model matching no prefix costs 0.0
# rather than a guess that would look authoritative in the log (its tokens are logged, so the cost can
# be recomputed). A newer model in a known family gets that family's price, which may overstate it.
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus": (15.0, 75.0),
    "claude-3-opus": (15.0, 75.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1


def estimate_cost(
    model: str,
    *,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> float:
    """USD for one call by PRICES; 0.0 for a model it does not know."""
    matches = [prefix for prefix in PRICES if model.startswith(prefix)]
    if not matches:
        return 0.0
    input_price, output_price = PRICES[max(matches, key=len)]
    micro_usd = (
        input_tokens * input_price
        + output_tokens * output_price
        + cache_creation_input_tokens * input_price * CACHE_WRITE_FACTOR
        + cache_read_input_tokens * input_price * CACHE_READ_FACTOR
    )
    # Rounded so the log shows 0.015, not 0.015000000000000001.
    return round(micro_usd / 1_000_000, 10)


class ClaudeRenderer(StructuredRenderer):
    """Writes messages and judges relevance with Claude through the Messages API."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str = "claude-sonnet-4-5",
        base_url: str | None = None,
        timeout_seconds: float = 10.0,
        max_tokens: int = 300,
        client: anthropic.Anthropic | None = None,
    ) -> None:
        """`timeout_seconds` bounds the connect and each read, not the whole call (httpx semantics).

        A `client` passed in is used as it is, its retries and timeout included; otherwise one client is
        built here, with no retries: a retry inside the call would hold the delivery while the queue
        already retries with backoff.
        """
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if client is None:
            if not api_key:
                raise ValueError("api_key is required")
            client = anthropic.Anthropic(
                api_key=api_key, base_url=base_url, timeout=timeout_seconds, max_retries=0
            )
        self._client = client
        self._model = model
        self._max_tokens = max_tokens

    def _write(
        self, message_data: Mapping[str, Any], style: str, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        prompt = render_prompt(message_data, style, conversation, max_length)
        message, usage = self._call("render", [{"role": "user", "content": prompt}])
        if message.stop_reason == "refusal":
            raise RenderUnavailable("the model refused to write this message", permanent=True)
        text = clean("".join(b.text for b in message.content if isinstance(b, TextBlock)))
        if not text:
            raise RenderUnavailable("the model returned no text", reason="empty")
        if looks_like_json(text):
            raise RenderUnavailable("the model returned JSON instead of a message", reason="json")
        if message.stop_reason == "max_tokens" and len(text) < max_length:
            # Stopped mid-sentence yet short enough: still mark it as cut.
            text = trim_end(text) + ELLIPSIS
        return Rendered(truncate(text, max_length), usage)

    def _judge(
        self, text: str, message_data: Mapping[str, Any], conversation: Sequence[Turn], queued: datetime
    ) -> Relevance:
        prompt = relevance_prompt(text, message_data, conversation, queued)
        message, usage = self._call(
            "relevance",
            [{"role": "user", "content": prompt}],
            tools=[RELEVANCE_TOOL],
            tool_choice={"type": "tool", "name": RELEVANCE_TOOL_NAME},
        )
        for block in message.content:
            if isinstance(block, ToolUseBlock) and block.name == RELEVANCE_TOOL_NAME:
                relevant = block.input.get("relevant")
                reason = block.input.get("reason")
                if isinstance(relevant, bool):
                    reason_text = reason.strip() if isinstance(reason, str) else ""
                    return Relevance(
                        relevant, truncate(reason_text or "no reason given", MAX_REASON_LENGTH), usage
                    )
        raise RenderUnavailable("the model did not record a relevance decision", reason="no_tool_use")

    def _call(self, operation: str, messages: list[MessageParam], **extra: Any) -> tuple[Message, Usage]:
        # Marked for caching so repeated calls within minutes read the prefix at 0.1x; a prompt below
        # the model's minimum cacheable length is simply not cached, and the marker costs nothing.
        system: list[TextBlockParam] = [
            {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}
        ]
        started = time.perf_counter()
        try:
            message = self._client.messages.create(
                model=self._model, max_tokens=self._max_tokens, system=system, messages=messages, **extra
            )
        except anthropic.AnthropicError as exc:
            error = _classify(exc)
            event(
                log,
                logging.WARNING,
                "model call failed",
                operation=operation,
                model=self._model,
                latencyMs=_elapsed_ms(started),
                status=error.details.get("status"),
                errorType=type(exc).__name__,
                permanent=error.permanent,
            )
            raise error from exc
        latency_ms = _elapsed_ms(started)
        usage = _usage(message, self._model, latency_ms)
        event(
            log,
            logging.INFO,
            "model call",
            operation=operation,
            stopReason=message.stop_reason,
            requestId=getattr(message, "_request_id", None),
            **usage.to_log(),
        )
        return message, usage


def _classify(exc: anthropic.AnthropicError) -> RenderUnavailable:
    """Transient for what the SDK itself would retry (timeouts, connection errors, 408/409/429/5xx);
    permanent for the other statuses, which say the request or the credentials are wrong."""
    if isinstance(exc, anthropic.APITimeoutError):
        return RenderUnavailable("Anthropic did not answer in time", reason="timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return RenderUnavailable("connection to Anthropic failed", reason="connection_error")
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        transient = status in (408, 409, 429) or status >= 500
        # getattr: api_message and type exist only in recent SDKs (pyproject allows anthropic>=0.40).
        error_type = getattr(exc, "type", None)
        detail = getattr(exc, "api_message", None) or error_type or "error"
        return RenderUnavailable(
            f"Anthropic answered {status}: {detail}",
            permanent=not transient,
            status=status,
            error_type=error_type if isinstance(error_type, str) else None,
        )
    return RenderUnavailable(f"Anthropic call failed: {type(exc).__name__}")


def _usage(message: Message, model: str, latency_ms: int) -> Usage:
    # The response names the exact snapshot that answered; it prices the same as the requested alias.
    answered_by = message.model if isinstance(message.model, str) and message.model else model
    u = message.usage
    input_tokens = u.input_tokens or 0
    output_tokens = u.output_tokens or 0
    cache_creation = u.cache_creation_input_tokens or 0
    cache_read = u.cache_read_input_tokens or 0
    return Usage(
        model=answered_by,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_creation_input_tokens=cache_creation,
        cache_read_input_tokens=cache_read,
        latency_ms=latency_ms,
        cost_usd=estimate_cost(
            answered_by,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_creation_input_tokens=cache_creation,
            cache_read_input_tokens=cache_read,
        ),
    )


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
