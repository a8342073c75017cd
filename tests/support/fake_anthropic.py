"""A local fake of Anthropic's Messages API, for the real `anthropic` client pointed at it by `base_url`.

It records every request (parsed JSON body and headers) and answers from a script, one behaviour per
request in order:

    with FakeAnthropic() as fake:
        fake.script(text("Hi Sam!"), status(500), delay(2.0), tool_use("record_relevance", {...}))
        client = anthropic.Anthropic(api_key="test-key", base_url=fake.url, max_retries=0)
        ...
        fake.requests[0].body["model"]

Answers have the real shapes: a message is `{"id", "type": "message", "role": "assistant", "model",
"content": [...], "stop_reason", "stop_sequence": null, "usage": {...}}`, an error is
`{"type": "error", "error": {"type": "api_error", "message": ...}}`. A request with an empty script
gets DEFAULT_TEXT. Only POST /v1/messages exists; a request without a key (`x-api-key` from older SDKs,
`Authorization: Bearer` from the 2.x SDK installed here) gets a 401, as the real API answers.

Stdlib only: http.server in a thread, on 127.0.0.1 and an ephemeral port.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

DEFAULT_TEXT = "This is the fake Anthropic server's default answer."

# The error `type` the real API puts in its body for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one request. Build it with text(), tool_use(), status() or delay()."""

    kind: str  # "message" | "error"
    content: tuple[dict[str, Any], ...] = ()
    stop_reason: str | None = "end_turn"
    usage: dict[str, int] | None = None  # None: estimated from the request and the answer
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    delay_seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


def text(answer: str, *, usage: dict[str, int] | None = None, stop_reason: str = "end_turn") -> Behaviour:
    """A message with one text block."""
    return Behaviour("message", ({"type": "text", "text": answer},), stop_reason, usage)


def tool_use(name: str, tool_input: dict[str, Any], *, usage: dict[str, int] | None = None) -> Behaviour:
    """A message with one tool_use block, stop_reason "tool_use" (what a forced tool_choice produces)."""
    block = {"type": "tool_use", "id": "toolu_" + secrets.token_hex(12), "name": name, "input": tool_input}
    return Behaviour("message", (block,), "tool_use", usage)


def status(code: int, message: str | None = None, *, error_type: str | None = None) -> Behaviour:
    """An error answer with the real error body; a 429 also carries retry-after."""
    headers = (("retry-after", "1"),) if code == 429 else ()
    return Behaviour(
        "error",
        status=code,
        error_type=error_type or ERROR_TYPES.get(code, "api_error"),
        error_message=message or f"fake error {code}",
        headers=headers,
    )


def delay(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """`then` (by default DEFAULT_TEXT) after `seconds`: longer than the client's timeout, a timeout.

    The wait ends early when the fake stops, so a test never waits for an answer nobody reads.
    """
    return replace(then or text(DEFAULT_TEXT), delay_seconds=seconds)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON, or None if the body was not JSON
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def api_key(self) -> str | None:
        """The key the client sent: `x-api-key` (older SDKs) or `Authorization: Bearer` (2.x SDKs)."""
        if self.headers.get("x-api-key"):
            return self.headers["x-api-key"]
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None


def _estimate_tokens(chars: int) -> int:
    # Roughly four characters a token, like English text through Claude's tokenizer.
    return max(1, chars // 4)


class FakeAnthropic:
    """The fake server; a context manager (`with FakeAnthropic() as fake:`) or start()/stop()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control ---------------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> FakeAnthropic:
        """Answer the next requests with these behaviours, in order, after any already scripted."""
        with self._lock:
            self._script.extend(behaviours)
        return self

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """How many scripted behaviours no request has used yet."""
        with self._lock:
            return len(self._script)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Anthropic server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeAnthropic:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A handler still sleeping in a delay() must not hold up stop().
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-anthropic", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- used by the handler -----------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> Behaviour:
        with self._lock:
            self._requests.append(request)
            return self._script.popleft() if self._script else text(DEFAULT_TEXT)

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _message_body(behaviour: Behaviour, request: Any, raw_request_length: int) -> dict[str, Any]:
    model = request.get("model") if isinstance(request, dict) else None
    output_chars = sum(
        len(b.get("text", "")) if b["type"] == "text" else len(json.dumps(b.get("input", {})))
        for b in behaviour.content
    )
    usage: dict[str, Any] = {
        "input_tokens": _estimate_tokens(raw_request_length),
        "output_tokens": _estimate_tokens(output_chars),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    usage.update(behaviour.usage or {})
    usage["cache_creation"] = {
        "ephemeral_5m_input_tokens": usage["cache_creation_input_tokens"],
        "ephemeral_1h_input_tokens": 0,
    }
    usage["service_tier"] = "standard"
    return {
        "id": "msg_" + secrets.token_hex(12),
        "type": "message",
        "role": "assistant",
        "model": model if isinstance(model, str) else "claude-sonnet-4-5",
        "content": [dict(b) for b in behaviour.content],
        "stop_reason": behaviour.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _handler_for(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-anthropic/1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # tests read fake.requests, not stderr

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = self.path.split("?", 1)[0]
            recorded = RecordedRequest("POST", self.path, headers, body)
            behaviour = fake._record(recorded)

            if path != "/v1/messages":
                self._send(404, _error_body("not_found_error", f"no such endpoint: {path}"))
                return
            if not recorded.api_key:
                self._send(401, _error_body("authentication_error", "invalid x-api-key"))
                return
            if not isinstance(body, dict) or not all(k in body for k in ("model", "max_tokens", "messages")):
                self._send(
                    400, _error_body("invalid_request_error", "model, max_tokens and messages are required")
                )
                return

            if behaviour.delay_seconds:
                fake._wait(behaviour.delay_seconds)
            if behaviour.kind == "error":
                error = _error_body(behaviour.error_type or "api_error", behaviour.error_message or "error")
                self._send(behaviour.status, error, behaviour.headers)
            else:
                self._send(200, _message_body(behaviour, body, len(raw)), behaviour.headers)

        def do_GET(self) -> None:
            fake._record(
                RecordedRequest("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, None)
            )
            self._send(404, _error_body("not_found_error", f"no such endpoint: {self.path}"))

        def _send(
            self, code: int, payload: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()
        ) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", "req_" + secrets.token_hex(12))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): exactly what a delay() is for

    return Handler
