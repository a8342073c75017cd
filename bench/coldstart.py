"""Cold start and memory: the functions as Cloud Functions run them, one functions-framework process
per entry point (gunicorn, one worker), against a bench database, the Cloud Tasks emulator and the
SMS sink (started once, outside every timing), all spoken to over real HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.run import Figure
from bench.support import Postgres

ABOUT = (
    "Each cold start is a new `functions-framework --target X --source functions/main.py` process "
    "(environment as deployed: DATABASE_URL, Cloud Tasks at the local emulator, Twilio at the local "
    "SMS sink, webhooks signed), timed from spawning it to its first answer: a 201 from "
    "schedule_message, a delivery sent to the sink from deliver_message (the task POSTed by the bench). "
    "Median of 5. The floor is the same for bench/floor_app.py's `echo`. Memory is the serving "
    "gunicorn worker's VmRSS after N requests over HTTP, one at a time."
)

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "functions" / "main.py"
FLOOR = REPO / "bench" / "floor_app.py"
QUEUE_PATH = "projects/bench-project/locations/local/queues/bench-delivery"
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-token"
FROM_NUMBER = "+15005550006"
RUNS = 5
REQUESTS = 2000
COLD_TARGET = 1.0
RATIO_TARGET = 2.5
RSS_TARGET = 150.0
GROWTH_TARGET = 5.0


class _TaskReceiver:
    """Where the emulator's tasks go (DELIVER_URL): answers 200 and drops them, so that what the
    bench schedules is never delivered behind its back."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _free_port() -> int:
    from shared.dev.tasks_emulator import free_port

    return free_port()


class Function:
    """One functions-framework process for one target, on a free port."""

    def __init__(self, target: str, env: Mapping[str, str], source: Path = MAIN) -> None:
        self.target = target
        self.port = _free_port()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                target,
                "--source",
                str(source),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=dict(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._conn: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def request(
        self, method: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request on a kept-alive connection (reopened if the server closed it)."""
        for attempt in (1, 2):
            conn = self._conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self._conn = conn
            try:
                conn.request(method, "/", body=body, headers=dict(headers or {}))
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self._conn = None
                return resp.status, data
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def first_answer(self, call: Callable[[], tuple[int, bytes]], timeout: float = 60.0) -> float:
        """Seconds from spawning the process to the first answer `call` gets (connection refusals
        while it starts are retried every 5 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited with {self.proc.returncode}")
            try:
                status, data = call()
            except OSError:
                time.sleep(0.005)
                continue
            elapsed = time.perf_counter() - self.started
            if status >= 300:
                raise RuntimeError(f"{self.target} answered {status}: {data[:300]!r}")
            return elapsed
        raise RuntimeError(f"{self.target} did not answer within {timeout:.0f} s")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the master and its worker have used so far: what a start costs
        whatever else the machine is doing, where wall time also counts waiting for a core."""
        pids = [self.proc.pid]
        if self.worker_pid() != self.proc.pid:
            pids.append(self.worker_pid())
        ticks = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / os.sysconf("SC_CLK_TCK")

    def worker_pid(self) -> int:
        """gunicorn's worker (forked from the master after the imports): the process that serves."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        children = path.read_text().split()
        return int(children[0]) if children else self.proc.pid

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def rss_mb(pid: int) -> float:
    """VmRSS of the process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for {pid}")


def function_env(
    database_url: str, tasks_host: str, sink_url: str, deliver_url: str, pycache: str
) -> dict[str, str]:
    """The functions' environment as deployed, pointed at the local stand-ins (as shared/dev/stack.py
    does, but with signatures checked: no TWILIO_SIGNATURE_BYPASS)."""
    project, _, location, _, queue = QUEUE_PATH.split("/")[1:6]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "SUPABASE_", "PUBSUB_"))}
    for name in ("EVENTS_TOPIC", "INBOUND_TOPIC", "TASKS_SERVICE_ACCOUNT", "ANTHROPIC_API_KEY"):
        env.pop(name, None)
    env.update(
        {
            "DATABASE_URL": database_url,
            "GOOGLE_CLOUD_PROJECT": project,
            "TASKS_LOCATION": location,
            "TASKS_QUEUE": queue,
            "DELIVER_URL": deliver_url,
            "CLOUD_TASKS_EMULATOR_HOST": tasks_host,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_PHONE_NUMBER": FROM_NUMBER,
            "TWILIO_API_BASE_URL": sink_url,
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
            # Bytecode compiled once (by the first process) and reused, as by a deployed build;
            # with PYTHONDONTWRITEBYTECODE every start would compile shared/ from source again.
            "PYTHONPYCACHEPREFIX": pycache,
        }
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def signed(url: str, form: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
    """A Twilio webhook body and headers, signed as Twilio signs them."""
    from twilio.request_validator import RequestValidator

    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, dict(form))
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    return urllib.parse.urlencode(form).encode(), headers


JSON = {"Content-Type": "application/json"}


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


class Users:
    """Bench users in the bench database, active now (so no quiet hours hold their messages)."""

    def __init__(self, database_url: str) -> None:
        from shared.store.postgres import PostgresStore

        self.store = PostgresStore(database_url)
        self._n = 0

    def new(self) -> tuple[uuid.UUID, str]:
        self._n += 1
        phone = f"+1557{self._n:07d}"
        user = uuid.UUID(self.store.upsert_user(phone, "UTC")["id"])
        self.store.record_inbound(user, "hi", "SM" + uuid.uuid4().hex, datetime.now(UTC))
        return user, phone

    def due_message(self) -> uuid.UUID:
        """A message of a new user, due now, scheduled in-process (its task recorded, not sent)."""
        from bench.support import InProcessTasks
        from shared import bootstrap, service
        from shared.config import Settings

        user, _ = self.new()
        body = {
            "userId": str(user),
            "agentId": "bench",
            "messageData": {"content": "cold"},
            "priority": "high",
        }
        now = datetime.now(UTC)
        config = bootstrap.Container(Settings()).policy
        result = service.schedule(
            body | {"canDelay": True}, store=self.store, tasks=InProcessTasks(), config=config, now=now
        )
        if result.message.scheduled_for > now:
            raise RuntimeError(f"a cold-start message was not due at once: {result.message.scheduled_for}")
        return result.message.id

    def close(self) -> None:
        self.store.close()


@contextlib.contextmanager
def stand_ins(database_url: str) -> Iterator[dict[str, str]]:
    """The emulator, the sink and the task receiver, started once; yields the functions' env."""
    from shared.dev.sink import SmsSink
    from shared.dev.tasks_emulator import TasksEmulator

    with tempfile.TemporaryDirectory(prefix="mq-coldstart-") as tmp:
        emulator = TasksEmulator(QUEUE_PATH, log_path=Path(tmp) / "emulator.log").start()
        sink = SmsSink().start()
        receiver = _TaskReceiver()
        try:
            yield function_env(
                database_url, emulator.host, sink.url, receiver.url, str(Path(tmp) / "pycache")
            )
        finally:
            receiver.stop()
            sink.stop()
            emulator.stop()


def _schedule_body(user: uuid.UUID, i: int) -> bytes:
    # Ten agents in turn: one agent may schedule at most 600 a minute.
    body = {"userId": str(user), "agentId": f"bench-{i % 10}", "messageData": {"content": f"hello {i}"}}
    return _json(body)


def _cold(
    target: str, env: Mapping[str, str], call: Callable[[Function], tuple[int, bytes]], source: Path = MAIN
) -> tuple[float, float]:
    """Wall seconds to the first answer, and the CPU seconds the process used for it."""
    fn = Function(target, env, source)
    try:
        return fn.first_answer(lambda: call(fn)), fn.cpu_seconds()
    finally:
        fn.stop()


def _post(body: bytes) -> Callable[[Function], tuple[int, bytes]]:
    return lambda fn: fn.request("POST", body, JSON)


def _deliver_call(message: uuid.UUID) -> Callable[[Function], tuple[int, bytes]]:
    def call(fn: Function) -> tuple[int, bytes]:
        status, data = fn.request("POST", _json({"messageId": str(message), "generation": 0}), JSON)
        if status == 200 and json.loads(data)["action"] != "sent":
            raise RuntimeError(f"the cold delivery did not send: {data[:300]!r}")
        return status, data

    return call


def cold_starts(env: Mapping[str, str], users: Users) -> dict[str, list[tuple[float, float]]]:
    """Seconds to the first answer, RUNS times each, the three kinds interleaved so that the
    machine's drift falls on all of them alike."""
    out: dict[str, list[tuple[float, float]]] = {"floor": [], "schedule": [], "deliver": []}
    for i in range(RUNS):
        user, _ = users.new()
        body = _schedule_body(user, i)
        message = users.due_message()
        out["floor"].append(_cold("echo", env, _post(body), FLOOR))
        out["schedule"].append(_cold("schedule_message", env, _post(body)))
        out["deliver"].append(_cold("deliver_message", env, _deliver_call(message)))
    return out


_PROFILE = """
import json, sys, time
t0 = time.perf_counter()
import functions_framework
t1 = time.perf_counter()
app = functions_framework.create_app(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
before = set(sys.modules)
client = app.test_client()
answer = client.post("/", data=sys.argv[3], content_type="application/json")
t3 = time.perf_counter()
def package(m):
    parts = m.split(".")
    keep = 3 if m.startswith("google.cloud.") else 2 if parts[0] == "google" else 1
    return ".".join(parts[:keep])
new = sorted({package(m) for m in set(sys.modules) - before})
print(json.dumps({"framework": t1 - t0, "main": t2 - t1, "first": t3 - t2, "status": answer.status_code,
                  "modules": len(set(sys.modules) - before), "packages": new}))
"""


def import_profile(env: Mapping[str, str], target: str, body: bytes, source: Path = MAIN) -> dict[str, Any]:
    """In a fresh interpreter: functions-framework's import, functions/main.py's, and the first
    request (in-process), with the packages that request imports."""
    done = subprocess.run(
        [sys.executable, "-c", _PROFILE, target, str(source), body.decode()],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


Step = Callable[[Function, int], tuple[int, bytes]]


def _memory(target: str, env: Mapping[str, str], step: Step) -> tuple[float, float, float]:
    """The worker's RSS (MB) after 1, 1,000 and 2,000 requests; every answer must be a 2xx."""
    fn = Function(target, env)
    try:
        fn.first_answer(lambda: step(fn, 0))
        marks = {1: rss_mb(fn.worker_pid())}
        for i in range(1, REQUESTS):
            status, data = step(fn, i)
            if status >= 300:
                raise RuntimeError(f"{target} request {i} answered {status}: {data[:300]!r}")
            if i + 1 in (REQUESTS // 2, REQUESTS):
                marks[i + 1] = rss_mb(fn.worker_pid())
        return marks[1], marks[REQUESTS // 2], marks[REQUESTS]
    finally:
        fn.stop()


def memory_steps(users: Users) -> dict[str, tuple[Step, str]]:
    """What each function is asked, REQUESTS times, and how the row describes it."""
    people = [users.new() for _ in range(200)]
    message = users.due_message()
    sent: dict[str, str] = {}

    def schedule(fn: Function, i: int) -> tuple[int, bytes]:
        return fn.request("POST", _schedule_body(people[i % len(people)][0], i), JSON)

    def deliver(fn: Function, i: int) -> tuple[int, bytes]:
        status, data = fn.request("POST", _json({"messageId": str(message), "generation": 0}), JSON)
        if status == 200 and i == 0:
            sent["sid"] = json.loads(data)["twilioMessageSid"]
        return status, data

    def inbound(fn: Function, i: int) -> tuple[int, bytes]:
        form = {
            "From": people[i % len(people)][1],
            "To": FROM_NUMBER,
            "Body": f"hi {i}",
            "MessageSid": f"SM{i:032x}",
        }
        return fn.request("POST", *signed(fn.url, form))

    def status_cb(fn: Function, i: int) -> tuple[int, bytes]:
        form = {
            "MessageSid": sent.get("sid") or "SM" + "0" * 32,
            "MessageStatus": ("sent", "delivered")[i % 2],
        }
        return fn.request("POST", *signed(fn.url, form))

    def health(fn: Function, i: int) -> tuple[int, bytes]:
        # No sweep runs in the bench, so health answers 503 sweep_stale: a full answer all the same.
        status, data = fn.request("GET")
        return (200 if status == 503 and b"sweep" in data else status), data

    return {
        "schedule_message": (schedule, "POST a message, 200 users and 10 agents in turn"),
        "deliver_message": (deliver, "one task sent, then replayed: answered without sending"),
        "twilio_inbound": (inbound, "signed SMS from 200 users in turn"),
        "twilio_status": (status_cb, "signed receipts for the sent message"),
        "health": (health, "GET; 503 sweep_stale, no sweep runs here"),
    }


def _cold_figures(
    cold: dict[str, list[tuple[float, float]]], profiles: dict[str, dict[str, Any]]
) -> list[Figure]:
    """The cold-start rows; where a target is missed the note says where the time goes, from the
    import profiles (in-process, so without the server's own start)."""

    def summary(kind: str) -> tuple[float, float, str]:
        wall = statistics.median(w for w, _ in cold[kind])
        cpu = statistics.median(c for _, c in cold[kind])
        runs = ", ".join(f"{w:.2f}" for w, _ in cold[kind])
        return wall, cpu, f"median of {RUNS}: {runs}; CPU {cpu:.2f} s"

    floor, floor_cpu, floor_note = summary("floor")
    load = os.getloadavg()[0]
    figures = [
        Figure(
            "Cold start floor: fresh process to echo's first 201",
            floor,
            "s",
            note=f"bench/floor_app.py, {floor_note}; load average {load:.1f} on {os.cpu_count()} cores",
        )
    ]
    kinds = (
        ("schedule", "schedule_message", "first schedule_message 201"),
        ("deliver", "deliver_message", "first delivery sent"),
    )
    for kind, target, what in kinds:
        value, cpu, note = summary(kind)
        p = profiles[target]
        if value > COLD_TARGET or value / floor > RATIO_TARGET:
            note += (
                f"; of it, in a process of its own: functions/main.py's import {p['main']:.2f} s and the "
                f"first request {p['first']:.2f} s (mostly its imports, see below), where the floor's "
                f"are {profiles['echo']['main']:.2f} s and {profiles['echo']['first']:.2f} s"
            )
        ratio_note = f"in CPU time: {cpu / floor_cpu:.2f}×"
        if value / floor > RATIO_TARGET:
            needed = p["needed"]
            parts = " + ".join(f"{NEEDED[target][m]} {t:.2f} s" for m, t in needed.items())
            total = sum(needed.values())
            ratio_note += (
                f"; the imports its first request cannot do without ({parts} = {total:.2f} s) are "
                f"{total / floor:.1f}× the floor's whole start, before functions/main.py's own "
                f"{p['main']:.2f} s: the floor plus them is {(floor + total) / floor:.2f}× the floor"
            )
            if (floor + total) / floor > RATIO_TARGET:
                ratio_note += (
                    f", over {RATIO_TARGET}× ({RATIO_TARGET * floor:.2f} s) before any code of ours runs"
                )
        figures += [
            Figure(f"Cold start: fresh process to {what}", value, "s", COLD_TARGET, False, note),
            Figure(f"Cold start to {what} / floor", value / floor, "×", RATIO_TARGET, False, ratio_note),
        ]
    return figures


def _profile_figures(profiles: dict[str, dict[str, Any]]) -> list[Figure]:
    """Import times, and what each first request imports beyond what the floor's first request does
    (the test client's and Flask's own)."""
    floor = profiles["echo"]
    first = profiles["schedule_message"]
    figures = [
        Figure(
            "Import of functions-framework itself",
            first["framework"],
            "s",
            note="every function's, the floor's too",
        ),
        Figure(
            "Import of functions/main.py",
            first["main"],
            "s",
            note=f"after functions-framework, before any request; floor_app.py: {floor['main']:.2f} s",
        ),
    ]
    for target, p in profiles.items():
        if target == "echo":
            continue
        extra = sorted(set(p["packages"]) - set(floor["packages"]))
        figures.append(
            Figure(
                f"{target}: first request in-process",
                p["first"],
                "s",
                note=f"answered {p['status']}; floor's {floor['first']:.2f} s; imports {p['modules']} "
                f"modules ({floor['modules']} for the floor), beyond the floor's: {', '.join(extra)}",
            )
        )
    return figures


def _memory_figures(target: str, marks: tuple[float, float, float], what: str) -> list[Figure]:
    one, mid, last = marks
    return [
        Figure(f"RSS of {target} after 1 request", one, "MB", RSS_TARGET, False),
        Figure(f"RSS of {target} after {REQUESTS:,} requests", last, "MB", RSS_TARGET, False, what),
        Figure(
            f"RSS growth of {target}, {REQUESTS // 2:,} to {REQUESTS:,} requests",
            last - mid,
            "MB",
            GROWTH_TARGET,
            False,
        ),
    ]


_NEEDED_SCRIPT = """
import importlib, json, sys, time
import functions_framework, functions.main
out = {}
for name in sys.argv[1:]:
    t = time.perf_counter()
    importlib.import_module(name)
    out[name] = time.perf_counter() - t
print(json.dumps(out))
"""

# The adapters each first request cannot do without, in the order it builds them, and what they
# bring in.
NEEDED = {
    "schedule_message": {"shared.store.postgres": "psycopg", "shared.tasks": "the Cloud Tasks client"},
    "deliver_message": {"shared.store.postgres": "psycopg", "shared.sms": "twilio"},
}


def needed_imports(env: Mapping[str, str], target: str) -> dict[str, float]:
    """Seconds to import each adapter module of NEEDED[target], one after the other, in a fresh
    interpreter that has imported functions/main.py."""
    done = subprocess.run(
        [sys.executable, "-c", _NEEDED_SCRIPT, *NEEDED[target]],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _profiles(env: Mapping[str, str], users: Users) -> dict[str, dict[str, Any]]:
    """The import profiles of the floor, schedule_message and deliver_message; each is run twice
    and the second kept, since the first compiles the bytecode every later process reuses."""
    out: dict[str, dict[str, Any]] = {}
    for _ in range(2):
        user, _ = users.new()
        out = {
            "echo": import_profile(env, "echo", _schedule_body(user, 0), FLOOR),
            "schedule_message": import_profile(env, "schedule_message", _schedule_body(user, 0)),
            "deliver_message": import_profile(
                env, "deliver_message", _json({"messageId": str(users.due_message()), "generation": 0})
            ),
        }
    for target in NEEDED:
        out[target]["needed"] = needed_imports(env, target)
    return out


def run(pg: Postgres) -> list[Figure]:
    with pg.database() as url, stand_ins(url) as env:
        users = Users(url)
        try:
            profiles = _profiles(env, users)
            figures = _cold_figures(cold_starts(env, users), profiles) + _profile_figures(profiles)
            for target, (step, what) in memory_steps(users).items():
                figures += _memory_figures(target, _memory(target, env, step), what)
        finally:
            users.close()
    return figures
