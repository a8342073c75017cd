"""The rendering adapter through the real `anthropic` client over real HTTP, against a local fake of the
Messages API (tests/support/fake_anthropic.py); the template renderer and the validation, directly."""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import pytest

from shared import render
from shared.errors import Unavailable
from shared.render import (
    ELLIPSIS,
    RELEVANCE_TOOL_NAME,
    STYLES,
    SYSTEM_PROMPT,
    ClaudeRenderer,
    Relevance,
    RenderUnavailable,
    TemplateRenderer,
    Turn,
    Usage,
    estimate_cost,
    needs_render,
    truncate,
    validate_structured,
)
from tests.support.fake_anthropic import FakeAnthropic, delay, status, text, tool_use

API_KEY = "test-key"
T0 = datetime(2026, 3, 2, 18, 0, tzinfo=UTC)
DATA: dict[str, Any] = {"type": "intro_match", "style": "snarky", "name": "Sam", "venue": "The Blue Door"}
CONVERSATION = [
    Turn("outbound", "Want me to find you someone to meet this week?", T0 - timedelta(minutes=30)),
    Turn("inbound", "yes please, somewhere quiet", T0 - timedelta(minutes=29)),
]
LONG_ANSWER = (
    "Well, well. Against all odds the universe found you a match: Sam, who also enjoys pretending to "
    "like jazz. You two are meeting at The Blue Door, which is quiet enough that you will have to "
    "actually talk to each other. Bring your best small talk and maybe a backup joke or two, because "
    "Sam has apparently heard them all before and is not easily impressed by anyone at all."
)


@pytest.fixture
def claude(fake: FakeAnthropic) -> ClaudeRenderer:
    return ClaudeRenderer(api_key=API_KEY, base_url=fake.url, timeout_seconds=0.5)


def _prompt(fake: FakeAnthropic, index: int = 0) -> str:
    [message] = fake.requests[index].body["messages"]
    assert message["role"] == "user"
    content = message["content"]
    return content if isinstance(content, str) else "".join(block["text"] for block in content)


# --- render through Claude ---------------------------------------------------------------------------


def test_a_long_answer_is_cut_at_a_word_boundary_within_max_length(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    fake.script(text(LONG_ANSWER))

    rendered = claude.render(DATA, conversation=CONVERSATION, max_length=160)

    assert len(rendered.text) <= 160
    assert rendered.text.endswith(ELLIPSIS)
    kept = rendered.text.removesuffix(ELLIPSIS)
    assert LONG_ANSWER.startswith(kept)
    assert LONG_ANSWER[len(kept)] in " ,."  # cut between words, not inside one
    assert len(kept) > 120  # and not needlessly short


def test_the_request_carries_the_cached_system_prompt_model_conversation_data_and_key(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    fake.script(text("Sam. The Blue Door. Try to act surprised."))

    claude.render(DATA, conversation=CONVERSATION, max_length=160)

    [request] = fake.requests
    assert request.path == "/v1/messages"
    # The 2.x SDK sends the key as "Authorization: Bearer", older ones as x-api-key.
    assert request.api_key == API_KEY
    assert request.headers["anthropic-version"]
    assert request.body["model"] == "claude-sonnet-4-5"
    assert request.body["max_tokens"] == 300
    assert request.body["system"] == [
        {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}
    ]
    assert "tools" not in request.body
    prompt = _prompt(fake)
    for turn in CONVERSATION:
        assert turn.content in prompt
    assert "user: yes please, somewhere quiet" in prompt
    assert "us: Want me to find you someone" in prompt
    assert json.dumps(DATA, ensure_ascii=False, sort_keys=True) in prompt
    assert "at most 160 characters" in prompt
    assert "snarky" in prompt


def test_only_the_latest_turns_are_sent(fake: FakeAnthropic, claude: ClaudeRenderer) -> None:
    turns = [Turn("inbound", f"message number {i:03d}", T0 + timedelta(minutes=i)) for i in range(30)]
    fake.script(text("ok then"))

    claude.render(DATA, conversation=turns, max_length=160)

    prompt = _prompt(fake)
    assert "message number 029" in prompt
    assert "message number 010" in prompt
    assert "message number 009" not in prompt


def test_quotes_and_whitespace_around_the_answer_are_stripped(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    fake.script(
        text('  "Sam is waiting at The Blue Door."\n'),
        text("```\nSee you at 8.\n```"),
        text("“Sam says ‘hi’”"),
        text('Sam said "see you"'),
    )

    texts = [claude.render(DATA, conversation=[], max_length=160).text for _ in range(4)]

    assert texts == [
        "Sam is waiting at The Blue Door.",
        "See you at 8.",
        "Sam says ‘hi’",
        'Sam said "see you"',
    ]


def test_an_answer_stopped_by_max_tokens_is_marked_as_cut(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    fake.script(text("Sam is waiting at The Blue Door and", stop_reason="max_tokens"))

    rendered = claude.render(DATA, conversation=[], max_length=160)

    assert rendered.text == "Sam is waiting at The Blue Door and" + ELLIPSIS


def test_a_message_with_content_is_passed_through_without_a_call(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    rendered = claude.render({"content": "  Your table is ready  "}, conversation=[], max_length=160)

    assert rendered.text == "Your table is ready"
    assert rendered.usage == Usage(model="none")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("behaviour", "expected_status"),
    [
        pytest.param(status(500), 500, id="500"),
        pytest.param(status(529), 529, id="529-overloaded"),
        pytest.param(status(429), 429, id="429"),
        pytest.param(delay(3.0), None, id="timeout"),
    ],
)
def test_transient_failures_raise_render_unavailable_after_exactly_one_request(
    fake: FakeAnthropic, claude: ClaudeRenderer, behaviour: Any, expected_status: int | None
) -> None:
    # A success queued behind the failure: a hidden client retry would take it and succeed.
    fake.script(behaviour, text("a retry got this"))

    with pytest.raises(RenderUnavailable) as caught:
        claude.render(DATA, conversation=CONVERSATION, max_length=160)

    error = caught.value
    assert not isinstance(error, anthropic.AnthropicError)
    assert isinstance(error, Unavailable)
    assert error.permanent is False
    assert error.details.get("status") == expected_status
    assert error.code == "render_unavailable"
    assert error.http_status == 503
    assert len(fake.requests) == 1
    assert fake.pending == 1


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413])
def test_client_errors_are_permanent(fake: FakeAnthropic, claude: ClaudeRenderer, code: int) -> None:
    fake.script(status(code))

    with pytest.raises(RenderUnavailable) as caught:
        claude.render(DATA, conversation=[], max_length=160)

    assert caught.value.permanent is True
    assert caught.value.details["status"] == code
    assert caught.value.details["error_type"] == render_error_type(code)
    assert len(fake.requests) == 1


def render_error_type(code: int) -> str:
    from tests.support.fake_anthropic import ERROR_TYPES

    return ERROR_TYPES[code]


def test_a_server_that_is_not_there_is_a_transient_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    claude = ClaudeRenderer(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}", timeout_seconds=0.5)

    with pytest.raises(RenderUnavailable) as caught:
        claude.render(DATA, conversation=[], max_length=160)

    assert caught.value.permanent is False
    assert caught.value.details["reason"] == "connection_error"


@pytest.mark.parametrize(
    "answer", ['{"text": "Hi Sam"}', '[{"type": "text"}]', "", "   ", '""', "```json\n{}\n```"]
)
def test_json_looking_or_empty_answers_are_never_sent(
    fake: FakeAnthropic, claude: ClaudeRenderer, answer: str
) -> None:
    fake.script(text(answer))

    with pytest.raises(RenderUnavailable) as caught:
        claude.render(DATA, conversation=[], max_length=160)

    assert caught.value.permanent is False
    assert caught.value.details["reason"] in ("json", "empty")


def test_a_refusal_is_permanent(fake: FakeAnthropic, claude: ClaudeRenderer) -> None:
    fake.script(text("", stop_reason="refusal"))

    with pytest.raises(RenderUnavailable) as caught:
        claude.render(DATA, conversation=[], max_length=160)

    assert caught.value.permanent is True


# --- usage and cost ------------------------------------------------------------------------------------

KNOWN_USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "cache_creation_input_tokens": 2000,
    "cache_read_input_tokens": 5000,
}


def test_usage_and_cost_come_from_the_response(
    fake: FakeAnthropic, claude: ClaudeRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(text("See you there.", usage=KNOWN_USAGE))

    with caplog.at_level(logging.INFO, logger="shared.render"):
        rendered = claude.render(DATA, conversation=[], max_length=160)

    usage = rendered.usage
    assert usage.model == "claude-sonnet-4-5"
    assert (usage.input_tokens, usage.output_tokens) == (1000, 200)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (2000, 5000)
    # 1000 x $3 + 200 x $15 + 2000 x $3.75 (cache write) + 5000 x $0.30 (cache read), per million.
    assert usage.cost_usd == 0.015
    assert 0 <= usage.latency_ms < 5000
    assert usage.to_log() == {
        "model": "claude-sonnet-4-5",
        "inputTokens": 1000,
        "outputTokens": 200,
        "cacheCreationInputTokens": 2000,
        "cacheReadInputTokens": 5000,
        "latencyMs": usage.latency_ms,
        "costUsd": 0.015,
    }
    [record] = [r for r in caplog.records if r.getMessage() == "model call"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["operation"] == "render"
    assert fields["costUsd"] == 0.015
    assert fields["inputTokens"] == 1000
    assert fields["latencyMs"] == usage.latency_ms


def test_a_failed_call_is_logged(
    fake: FakeAnthropic, claude: ClaudeRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(status(503))

    with caplog.at_level(logging.INFO, logger="shared.render"), pytest.raises(RenderUnavailable):
        claude.render(DATA, conversation=[], max_length=160)

    [record] = [r for r in caplog.records if r.getMessage() == "model call failed"]
    assert record.levelno == logging.WARNING
    assert record.fields["status"] == 503  # type: ignore[attr-defined]
    assert record.fields["permanent"] is False  # type: ignore[attr-defined]


def test_a_haiku_model_is_priced_as_haiku(fake: FakeAnthropic) -> None:
    claude = ClaudeRenderer(api_key=API_KEY, base_url=fake.url, model="claude-haiku-4-5", timeout_seconds=0.5)
    fake.script(text("See you there.", usage={"input_tokens": 1000, "output_tokens": 1000}))

    rendered = claude.render(DATA, conversation=[], max_length=160)

    assert fake.requests[0].body["model"] == "claude-haiku-4-5"
    assert rendered.usage.cost_usd == 0.006  # 1000 x $1 + 1000 x $5, per million


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-sonnet-4-5", 18.0),
        ("claude-sonnet-4-5-20250929", 18.0),
        ("claude-haiku-4-5", 6.0),
        ("claude-opus-4-1", 90.0),
        ("gpt-4o", 0.0),
    ],
)
def test_estimate_cost_per_million_tokens(model: str, expected: float) -> None:
    assert estimate_cost(model, input_tokens=1_000_000, output_tokens=1_000_000) == expected


# --- judge_relevance through Claude ----------------------------------------------------------------------


def test_judge_relevance_forces_the_tool_and_returns_its_input(
    fake: FakeAnthropic, claude: ClaudeRenderer
) -> None:
    since = Turn("inbound", "actually I already found a date, thanks", T0 + timedelta(minutes=5))
    fake.script(tool_use(RELEVANCE_TOOL_NAME, {"relevant": False, "reason": "user already found a date"}))

    relevance = claude.judge_relevance(
        "Sam is waiting at The Blue Door.", DATA, conversation=[*CONVERSATION, since], queued_at=T0
    )

    assert relevance.relevant is False
    assert relevance.reason == "user already found a date"
    assert relevance.usage.model == "claude-sonnet-4-5"
    body = fake.requests[0].body
    assert body["tool_choice"] == {"type": "tool", "name": RELEVANCE_TOOL_NAME}
    [tool] = body["tools"]
    assert tool["name"] == RELEVANCE_TOOL_NAME
    assert tool["input_schema"]["properties"]["relevant"]["type"] == "boolean"
    assert tool["input_schema"]["properties"]["reason"]["type"] == "string"
    assert sorted(tool["input_schema"]["required"]) == ["reason", "relevant"]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    prompt = _prompt(fake)
    assert "Sam is waiting at The Blue Door." in prompt
    assert T0.isoformat() in prompt
    assert json.dumps(DATA, ensure_ascii=False, sort_keys=True) in prompt
    since_section = prompt.split("<conversation_since_queued>", 1)[1]
    assert "actually I already found a date" in since_section
    assert "yes please, somewhere quiet" not in since_section


def test_judge_relevance_keeps_the_reason_short(fake: FakeAnthropic, claude: ClaudeRenderer) -> None:
    fake.script(tool_use(RELEVANCE_TOOL_NAME, {"relevant": True, "reason": "because " * 100}))

    relevance = claude.judge_relevance("Hi", DATA, conversation=[], queued_at=T0)

    assert relevance == Relevance(True, relevance.reason, relevance.usage)
    assert len(relevance.reason) <= 200


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(text("Yes, it is still relevant."), id="text-only"),
        pytest.param(tool_use("some_other_tool", {"relevant": True, "reason": "x"}), id="other-tool"),
        pytest.param(tool_use(RELEVANCE_TOOL_NAME, {"relevant": "yes", "reason": "x"}), id="not-a-boolean"),
        pytest.param(tool_use(RELEVANCE_TOOL_NAME, {"reason": "x"}), id="missing-relevant"),
    ],
)
def test_judge_relevance_without_a_valid_tool_use_is_unavailable(
    fake: FakeAnthropic, claude: ClaudeRenderer, behaviour: Any
) -> None:
    fake.script(behaviour)

    with pytest.raises(RenderUnavailable) as caught:
        claude.judge_relevance("Hi", DATA, conversation=[], queued_at=T0)

    assert caught.value.permanent is False


def test_judge_relevance_timeout_is_unavailable(fake: FakeAnthropic, claude: ClaudeRenderer) -> None:
    fake.script(delay(3.0, tool_use(RELEVANCE_TOOL_NAME, {"relevant": True, "reason": "x"})))

    with pytest.raises(RenderUnavailable) as caught:
        claude.judge_relevance("Hi", DATA, conversation=[], queued_at=T0)

    assert caught.value.details["reason"] == "timeout"
    assert len(fake.requests) == 1


# --- the template renderer -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_template_is_deterministic_plain_and_within_length(style: str) -> None:
    data = {**DATA, "style": style, "details": {"time": "8pm", "dress": None}, "tags": ["quiet", "jazz"]}
    renderer = TemplateRenderer()

    first = renderer.render(data, conversation=CONVERSATION, max_length=160)
    second = renderer.render(dict(reversed(list(data.items()))), conversation=[], max_length=160)

    assert first == second
    assert first.text
    assert len(first.text) <= 160
    assert not first.text.startswith(("{", "["))
    assert "{" not in first.text and '"' not in first.text
    assert "Sam" in first.text and "The Blue Door" in first.text
    assert first.usage == Usage(model="template")


def test_template_styles_differ() -> None:
    texts = {
        TemplateRenderer().render({**DATA, "style": s}, conversation=[], max_length=320).text for s in STYLES
    }
    assert len(texts) == len(STYLES)


def test_template_without_a_style_is_neutral() -> None:
    data = {k: v for k, v in DATA.items() if k != "style"}
    renderer = TemplateRenderer()
    assert (
        renderer.render(data, conversation=[], max_length=320).text
        == renderer.render({**data, "style": "neutral"}, conversation=[], max_length=320).text
        == "You've been matched with Sam at The Blue Door."
    )


def test_template_of_an_unknown_type_lists_the_fields_sorted_and_humanised() -> None:
    data = {"type": "table_ready", "partySize": 4, "venue_name": "Blue Door", "outdoor": True}

    rendered = TemplateRenderer().render(data, conversation=[], max_length=320)

    assert rendered.text == "Table ready: Outdoor: yes; Party size: 4; Venue name: Blue Door."


def test_template_keeps_fields_its_template_does_not_use() -> None:
    data = {"type": "intro_match", "name": "Sam", "time": "8pm"}

    assert (
        TemplateRenderer().render(data, conversation=[], max_length=320).text
        == "You've been matched with Sam. Time: 8pm."
    )


def test_template_is_cut_to_max_length() -> None:
    data = {"type": "intro_match", "style": "chaotic", "name": "Sam " * 50}

    rendered = TemplateRenderer().render(data, conversation=[], max_length=40)

    assert len(rendered.text) <= 40
    assert rendered.text.endswith(ELLIPSIS)


def test_template_judge_relevance_drops_a_message_the_user_wrote_after() -> None:
    renderer = TemplateRenderer()
    before = Turn("inbound", "hi", T0 - timedelta(minutes=1))
    ours_after = Turn("outbound", "hello", T0 + timedelta(minutes=1))
    theirs_after = Turn("inbound", "never mind", T0 + timedelta(minutes=2))

    kept = renderer.judge_relevance("Hi", DATA, conversation=[before, ours_after], queued_at=T0)
    dropped = renderer.judge_relevance("Hi", DATA, conversation=[before, theirs_after], queued_at=T0)

    assert kept.relevant is True
    assert dropped == Relevance(
        False,
        "the user wrote since it was queued, and no model (ANTHROPIC_API_KEY unset) could judge it",
        Usage(model="template"),
    )


# --- validation and helpers ------------------------------------------------------------------------------


def test_needs_render() -> None:
    assert needs_render(DATA) is True
    assert needs_render({"content": "hello"}) is False
    assert needs_render({"content": 5, "type": "x"}) is True


def test_valid_structured_data_has_no_errors() -> None:
    assert validate_structured(DATA) == []
    assert validate_structured({"type": "x", "anything": [1, {"nested": None}], "style": None}) == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "Sam"}, "messageData.type"),
        ({"type": ""}, "messageData.type"),
        ({"type": "   "}, "messageData.type"),
        ({"type": 7}, "messageData.type"),
        ({"type": "x" * 101}, "messageData.type"),
        ({"type": "x", "style": "sarcastic"}, "messageData.style"),
        ({"type": "x", "style": 1}, "messageData.style"),
        ({"type": "x", "content": 5}, "messageData.content"),
        ({"type": "x", "blob": "y" * 4000}, "messageData"),
        ({"type": "x", "bad": {1, 2}}, "messageData"),
        ({"type": "x", "bad": float("nan")}, "messageData"),
    ],
)
def test_invalid_structured_data(data: dict[str, Any], field: str) -> None:
    errors = validate_structured(data)

    assert [e["field"] for e in errors] == [field]
    assert all(e["reason"] for e in errors)


def test_validate_structured_reports_every_error() -> None:
    errors = validate_structured({"style": "loud"})

    assert [e["field"] for e in errors] == ["messageData.type", "messageData.style"]


@pytest.mark.parametrize(
    ("source", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly ten", 11, "exactly ten"),
        ("one two three four", 10, "one two…"),
        ("one, two three", 6, "one…"),
        ("abcdefghijklmnop", 6, "abcde…"),
        ("anything", 1, "…"),
    ],
)
def test_truncate(source: str, limit: int, expected: str) -> None:
    assert truncate(source, limit) == expected
    assert len(truncate(source, limit)) <= limit


def test_render_unavailable_defaults() -> None:
    error = RenderUnavailable()
    assert (
        error.message
        == "Message rendering is unavailable; the message stays queued and is tried again later."
    )
    assert error.permanent is False
    assert error.to_dict()["error"] == "render_unavailable"
    assert RenderUnavailable(permanent=True).permanent is True
    assert render.RenderUnavailable.permanent is False
