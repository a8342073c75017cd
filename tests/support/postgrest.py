"""A minimal local stand-in for Supabase's REST API (PostgREST behind the API gateway), for tests.

No PostgREST binary can be installed here, so this serves the one thing the supabase store uses,
`POST /rest/v1/rpc/<function>`, the way PostgREST does it, on a REAL PostgreSQL database:

- the JSON object body holds the named arguments; the function is chosen among the overloads in the
  schema by those names (every key a parameter, every parameter without a default present), else
  404 PGRST202 (300 PGRST203 when ambiguous); the arguments are converted the way PostgREST converts
  them, through `json_to_record(body) as a(p_x <type>, ...)` with the types from pg_proc;
- a function returning a scalar (jsonb, bool, int, text, a composite) answers 200 with that JSON value
  itself (`null` for NULL); a set-returning one a JSON array; a void one 204 without a body;
- database errors come back as PostgREST does: `{"code": <SQLSTATE>, "message", "details", "hint"}`
  with PostgREST's status for the SQLSTATE (23514 → 400, 23505 → 409, 08* → 503, ...);
- the `apikey` and `Authorization: Bearer <key>` headers are required (401 otherwise), and must equal
  `service_key` when one is given.

Every request is recorded (method, path, query, headers, parsed JSON body), so tests can assert the
exact calls a client makes. `unavailable = True` (or `fail_status`/`fail_body`) makes it answer like
an outage; `delay_seconds` delays every answer (client timeouts).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

RPC_PREFIX = "/rest/v1/rpc/"

_FUNCTIONS = """
select p.proname, p.pronargs, p.pronargdefaults, p.proretset,
       p.prorettype = 'void'::regtype as returns_void,
       coalesce(p.proargnames, '{}'::text[]) as argnames,
       coalesce(p.proargmodes::text[], '{}'::text[]) as argmodes,
       array(select format_type(t.oid, null)
             from unnest(p.proargtypes::oid[]) with ordinality as t(oid, n) order by t.n) as argtypes
from pg_proc p join pg_namespace ns on ns.oid = p.pronamespace
where ns.nspname = %s and p.proname = %s and p.prokind = 'f'
"""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON body; None when empty or not JSON
    raw_body: bytes

    @property
    def function(self) -> str | None:
        return self.path[len(RPC_PREFIX) :] if self.path.startswith(RPC_PREFIX) else None


@dataclass(frozen=True)
class _Function:
    name: str
    args: list[tuple[str, str]]  # (name, type) of the input parameters, in order
    required: frozenset[str]
    returns_set: bool
    returns_void: bool


def _error(code: str | None, message: str, details: Any = None, hint: Any = None) -> dict[str, Any]:
    return {"code": code, "details": details, "hint": hint, "message": message}


def http_status_for(sqlstate: str | None) -> int:
    """PostgREST's documented mapping of PostgreSQL error codes to HTTP statuses."""
    if not sqlstate:
        return 500
    exact = {"23503": 409, "23505": 409, "25006": 405, "53400": 500, "P0001": 400,
             "42883": 404, "42P01": 404, "42501": 403}  # fmt: skip
    if sqlstate in exact:
        return exact[sqlstate]
    by_class = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500,
                "38": 500, "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500,
                "57": 500, "58": 500, "F0": 500, "HV": 500, "P0": 500, "XX": 500}  # fmt: skip
    return by_class.get(sqlstate[:2], 400)


class PostgrestStandIn:
    """An HTTP server on 127.0.0.1 (ephemeral port) in a background thread. `url` is the value for
    SUPABASE_URL; call `stop()` when done."""

    def __init__(self, database_url: str, *, service_key: str | None = None, schema: str = "public") -> None:
        self.database_url = database_url
        self.service_key = service_key
        self.schema = schema
        self.requests: list[RecordedRequest] = []
        self.fail_status: int | None = None
        self.fail_body: bytes | None = None  # default: a PostgREST-shaped error for fail_status
        self.delay_seconds = 0.0
        self._stopped = False
        self._lock = threading.Lock()
        self._pool = ConnectionPool(
            database_url, min_size=0, max_size=8, timeout=5.0, kwargs={"autocommit": True}, open=True
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="postgrest-stand-in",
            daemon=True,
        )
        self._thread.start()

    # --- test controls -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def unavailable(self) -> bool:
        return self.fail_status == 503

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        self.fail_status = 503 if value else None
        self.fail_body = None

    def rpc_calls(self, function: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            calls = [r for r in self.requests if r.function is not None]
        return [r for r in calls if function is None or r.function == function]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def stop(self) -> None:
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._pool.close()

    # --- PostgREST -----------------------------------------------------------------------------

    def _check_auth(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        apikey = headers.get("apikey")
        if not apikey:
            return 401, {"message": "No API key found in request", "hint": "No `apikey` request header"}
        if self.service_key is not None and apikey != self.service_key:
            return 401, {"message": "Invalid API key", "hint": "Double check your Supabase API key."}
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, _error("PGRST301", "No suitable key or wrong key type: missing Bearer token")
        if self.service_key is not None and token.strip() != self.service_key:
            return 401, _error("PGRST301", "JWSError JWSInvalidSignature")
        return None

    def _functions(self, conn: psycopg.Connection[Any], name: str) -> list[_Function]:
        found = []
        for proname, nargs, ndefaults, retset, void, names, modes, types in conn.execute(
            _FUNCTIONS, [self.schema, name]
        ).fetchall():
            if modes:  # keep the input parameters (in, inout, variadic) only
                names = [n for n, m in zip(names, modes, strict=True) if m in ("i", "b", "v")]
            names = list(names)[:nargs]
            if len(names) != nargs or any(not n for n in names):
                continue  # unnamed parameters cannot be called with a JSON object
            args = list(zip(names, types, strict=True))
            required = frozenset(names[: nargs - ndefaults])
            found.append(_Function(proname, args, required, bool(retset), bool(void)))
        return found

    def call(self, function: str, body: dict[str, Any]) -> tuple[int, bytes | None]:
        """Run `function` with the named arguments in `body`, as PostgREST would; (status, body)."""
        try:
            with self._pool.connection() as conn:
                return self._call(conn, function, body)
        except PoolTimeout:
            return 504, _json(_error("PGRST003", "Timed out acquiring connection from connection pool."))
        except psycopg.Error as exc:
            return 503, _json(_error("PGRST001", "Database client error. Retrying the connection.", str(exc)))

    def _call(
        self, conn: psycopg.Connection[Any], function: str, body: dict[str, Any]
    ) -> tuple[int, bytes | None]:
        keys = set(body)
        candidates = self._functions(conn, function)
        matches = [f for f in candidates if keys <= {n for n, _ in f.args} and f.required <= keys]
        qualified = f"{self.schema}.{function}"
        if not matches:
            listed = ", ".join(sorted(keys))
            hint = None
            if candidates:
                options = ", ".join(n for n, _ in candidates[0].args)
                hint = f"Perhaps you meant to call the function {qualified}({options})"
            return 404, _json(
                _error(
                    "PGRST202",
                    f"Could not find the function {qualified}({listed}) in the schema cache",
                    f"Searched for the function {qualified} with parameters {listed} or with a single "
                    "unnamed json/jsonb parameter, but no matches were found in the schema cache.",
                    hint,
                )
            )
        if len(matches) > 1:
            return 300, _json(
                _error("PGRST203", f"Could not choose the best candidate function between: {qualified}")
            )
        fn = matches[0]
        used = [(n, t) for n, t in fn.args if n in keys]
        call = sql.SQL("{}({})").format(
            sql.Identifier(self.schema, fn.name),
            sql.SQL(", ").join(
                sql.SQL("{} => a.{}").format(sql.Identifier(n), sql.Identifier(n)) for n, _ in used
            ),
        )
        source: sql.Composable = sql.SQL("")
        params: list[Any] = []
        if used:
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in used
            )
            source = sql.SQL(" from json_to_record({}::json) as a({})").format(sql.Placeholder(), columns)
            params.append(json.dumps(body))
        if fn.returns_void:
            query = sql.SQL("select {}{}").format(call, source)
        elif fn.returns_set:
            query = sql.SQL("select coalesce(json_agg(s.r), '[]')::text from (select {} as r{}) s").format(
                call, source
            )
        else:
            query = sql.SQL("select to_json({})::text{}").format(call, source)
        try:
            row = conn.execute(query, params).fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate is None:  # the connection itself failed: 503 from call()
                raise
            diag = exc.diag
            return http_status_for(exc.sqlstate), _json(
                _error(exc.sqlstate, diag.message_primary or str(exc), diag.message_detail, diag.message_hint)
            )
        if fn.returns_void:
            return 204, None
        text = None if row is None else row[0]
        return 200, ("null" if text is None else text).encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "postgrest-stand-in"
            wbufsize = -1  # buffered: headers and body leave in one write (flushed per request)
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _respond(
                self, status: int, body: bytes | None, content_type: str = "application/json"
            ) -> None:
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    parsed: Any = json.loads(raw) if raw else None
                    valid_json = True
                except ValueError:
                    parsed, valid_json = None, False
                with stand_in._lock:
                    stand_in.requests.append(
                        RecordedRequest(self.command, path, parts.query, headers, parsed, raw)
                    )
                if stand_in.delay_seconds:
                    time.sleep(stand_in.delay_seconds)
                if stand_in._stopped:  # a delayed answer after stop(): the database may be gone
                    self.close_connection = True
                    return
                if stand_in.fail_status is not None:
                    body = stand_in.fail_body
                    if body is None:
                        body = _json(_error("PGRST001", "Database client error. Retrying the connection."))
                    self._respond(stand_in.fail_status, body)
                    return
                refused = stand_in._check_auth(headers)
                if refused is not None:
                    self._respond(refused[0], _json(refused[1]))
                    return
                if not path.startswith(RPC_PREFIX) or "/" in path[len(RPC_PREFIX) :]:
                    self._respond(
                        404, _json(_error("PGRST125", f"Invalid path specified in request URL: {path}"))
                    )
                    return
                if self.command != "POST":
                    self._respond(
                        405, _json(_error("PGRST101", "The stand-in only implements POST for functions"))
                    )
                    return
                if not valid_json or (raw and not isinstance(parsed, dict)):
                    self._respond(400, _json(_error("PGRST102", "Empty or invalid json")))
                    return
                status, body = stand_in.call(path[len(RPC_PREFIX) :], parsed or {})
                self._respond(status, body)

            do_POST = _handle
            do_GET = _handle
            do_PATCH = _handle
            do_PUT = _handle
            do_DELETE = _handle

        return Handler


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()
