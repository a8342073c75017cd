"""One root exception; every error the use cases raise derives from it.

Each class's docstring is its default message, so `raise NotFound()` still says something useful.
Entry points turn these into HTTP answers (see `http_status`); adapters translate the errors of the
libraries they wrap into these at their boundary, so nothing above them sees psycopg or twilio types.
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """The message orchestrator could not complete the request."""

    http_status = 500
    code = "internal_error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": False, "error": self.code, "message": self.message}
        body.update(self.details)
        return body


class ValidationError(OrchestratorError):
    """The request is not valid."""

    http_status = 400
    code = "invalid_request"

    def __init__(self, errors: list[dict[str, str]], message: str | None = None) -> None:
        fields = ", ".join(e["field"] for e in errors)
        super().__init__(message or f"invalid field(s): {fields}", errors=errors)
        self.errors = errors


class Forbidden(OrchestratorError):
    """The request's signature is missing or invalid."""

    http_status = 403
    code = "forbidden"


class Unauthenticated(OrchestratorError):
    """The caller's identity is missing or cannot be read."""

    http_status = 401
    code = "unauthenticated"


class ForbiddenAgent(Forbidden):
    """The caller may not act as this agent."""

    code = "forbidden_agent"


class NotFound(OrchestratorError):
    """No such resource."""

    http_status = 404
    code = "not_found"


class Conflict(OrchestratorError):
    """The request conflicts with the current state."""

    http_status = 409
    code = "conflict"


class OptedOut(Conflict):
    """The user has opted out of messages (replied STOP); nothing will be sent."""

    code = "opted_out"


class Undeliverable(Conflict):
    """Twilio reported the user's number cannot receive SMS; nothing will be sent."""

    code = "undeliverable"


class NotificationsDisabled(Conflict):
    """The user switched notifications off; only urgent messages go out to them."""

    code = "notifications_disabled"


class NotCancellable(Conflict):
    """The message is being sent or is already final; only a queued message can be cancelled."""

    code = "not_cancellable"


class IdempotencyConflict(Conflict):
    """This idempotency key was already used with a different request body."""

    code = "idempotency_key_reused"


class PayloadTooLarge(OrchestratorError):
    """The request body is larger than this function accepts."""

    http_status = 413
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body must be at most {limit} bytes ({limit // 1024} KiB)", limit=limit)


class TooManyRequests(OrchestratorError):
    """Too many requests; retry later."""

    http_status = 429
    code = "too_many_requests"
    retry_after: int | None = None  # seconds, for the Retry-After header


class UserQueueFull(TooManyRequests):
    """The user has as many messages queued as allowed; wait until some are sent, or cancel some."""

    code = "user_queue_full"


class AgentRateLimited(TooManyRequests):
    """This agent scheduled as many messages as allowed in the last minute; retry after Retry-After."""

    code = "agent_rate_limited"

    def __init__(self, message: str | None = None, *, retry_after: int, **details: Any) -> None:
        super().__init__(message, retryAfterSeconds=retry_after, **details)
        self.retry_after = retry_after


class NotDeliverable(OrchestratorError):
    """The message cannot be delivered before it expires."""

    http_status = 422
    code = "not_deliverable"


class Unavailable(OrchestratorError):
    """A backing service is unavailable; retry later."""

    http_status = 503
    code = "unavailable"


class StoreUnavailable(Unavailable):
    """The database is unavailable; nothing was written. Retry later."""

    code = "database_unavailable"


class RenderUnavailable(Unavailable):
    """Message rendering is unavailable; the message stays queued and is tried again later."""

    code = "render_unavailable"
    # True when retrying the same request cannot succeed until configuration or the message changes
    # (bad key, rejected request, refusal): the caller may fail fast instead of retrying.
    permanent: bool = False

    def __init__(self, message: str | None = None, *, permanent: bool = False, **details: Any) -> None:
        super().__init__(message, permanent=permanent, **details)
        self.permanent = permanent


class StoreError(OrchestratorError):
    """The database rejected an operation."""

    code = "database_error"


class SendError(OrchestratorError):
    """The SMS provider refused or failed to send the message."""

    def __init__(
        self, message: str | None = None, *, code: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, provider_code=code, provider_status=status)
        self.provider_code = code
        self.provider_status = status


class PermanentSendError(SendError):
    """The SMS provider refused the message permanently (invalid, unreachable or opted-out number)."""


class RecipientOptedOut(PermanentSendError):
    """The recipient unsubscribed at the SMS provider (Twilio 21610): nothing reaches them until opt-in."""


class TransientSendError(SendError):
    """The SMS provider failed for now (rate limit, server error or timeout); retry later."""

    # True when the request may have reached the provider and been accepted (a read timeout, a dropped
    # connection, an unreadable 2xx): sending again before asking the provider could send twice.
    maybe_sent = False
