"""The Store over Supabase's REST API (PostgREST) with supabase-py (SUPABASE_URL + SUPABASE_SERVICE_KEY).

Every call is ONE `client.rpc("mq_...", {named params}).execute()`: a POST to /rest/v1/rpc/mq_...
that PostgREST runs as one transaction, calling the same SQL function the psycopg store calls. The
JSON keys are the SQL function's parameter names (p_user_id, p_now, ...), every one sent, None as an
explicit null; instants travel as ISO 8601 strings with their own offset, UUIDs as strings, dates
and times as ISO strings, jsonb as JSON. PostgREST answers a function returning a scalar jsonb with
that JSON value itself (an object, `null`, `true`, a string, a number), which supabase-py hands back
as `.data`; it is decoded with shared.store.decode exactly like the psycopg store's result.

Errors are translated here, so nothing above sees httpx or postgrest types: the service cannot be
reached, timed out, or answered 5xx → StoreUnavailable (retry later); PostgREST refused the call
(4xx: unknown function or argument, invalid input, constraint violation) → StoreError.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime, time
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import Client, ClientOptions, create_client

from shared.errors import StoreError, StoreUnavailable
from shared.store.driver import Json
from shared.store.store import SqlStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0

# PostgREST's own error codes that mean the database is unreachable or busy (HTTP 503/504).
_UNAVAILABLE_PGRST_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
# SQLSTATE classes PostgREST answers with a 5xx (its documented status table): connection,
# transaction state and rollback (serialization failures, deadlocks), resources, operator
# intervention (statement timeout, shutdown), system and internal errors.
_SERVER_SQLSTATE_CLASSES = frozenset(
    {"08", "09", "25", "2D", "38", "39", "3B", "40", "53", "54", "55", "57", "58", "F0", "HV", "XX"}
)


def _raise_on_server_error(response: httpx.Response) -> None:
    """httpx response hook: a 5xx from the API gateway or PostgREST is an outage, whatever its body."""
    if response.status_code >= 500:
        response.read()
        raise httpx.HTTPStatusError(
            f"server error {response.status_code}", request=response.request, response=response
        )


def _is_unavailable(error: APIError) -> bool:
    """For an APIError that did not pass through the hook (a client built elsewhere)."""
    code = str(error.code or "")
    if len(code) == 3 and code.isdigit():  # not a PostgREST JSON body: supabase-py puts the HTTP status
        return int(code) >= 500
    if code in _UNAVAILABLE_PGRST_CODES:
        return True
    if code.startswith("PGRST") or len(code) != 5 or code in ("25006", "P0001"):  # 4xx in PostgREST
        return False
    return code[:2] in _SERVER_SQLSTATE_CLASSES or code.startswith("P0")


def _instant(value: datetime) -> str:
    # A naive instant would be read in the server's zone: refused before anything is sent.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
    return value.isoformat()


def _encode(value: Any) -> Any:
    """A parameter as JSON. Json's value goes as it is: it is JSON already (no instants inside)."""
    if isinstance(value, Json):
        return value.value
    if isinstance(value, datetime):  # before date: a datetime is a date too
        return _instant(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class PostgrestDriver:
    def __init__(self, client: Client) -> None:
        self._client = client

    def call(self, function: str, /, **args: Any) -> Any:
        """One POST /rest/v1/rpc/<function>; returns the function's JSON result."""
        params = {f"p_{name}": _encode(value) for name, value in args.items()}
        try:
            response = self._client.rpc(function, params).execute()
        except httpx.HTTPStatusError as exc:
            log.warning("%s: PostgREST answered %s", function, exc.response.status_code)
            raise StoreUnavailable() from exc
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            log.warning("%s: %s", function, type(exc).__name__)
            raise StoreUnavailable() from exc
        except APIError as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable() from exc
            raise StoreError(f"database error in {function}: {exc.code}") from exc
        return response.data

    def close(self) -> None:
        """Close the HTTP connections (the client's own session)."""
        self._client.postgrest.aclose()


class SupabaseStore(SqlStore):
    def __init__(self, client: Client) -> None:
        super().__init__(PostgrestDriver(client))

    @classmethod
    def connect(
        cls, url: str, service_key: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> SupabaseStore:
        """One client per instance: a keep-alive HTTP connection pool with a bounded timeout, and no
        retry of its own (a POST retried behind the caller's back could run a function twice)."""
        http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=True,
            http2=True,
            event_hooks={"response": [_raise_on_server_error]},
        )
        options = ClientOptions(
            httpx_client=http,
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        )
        return cls(create_client(url, service_key, options))
