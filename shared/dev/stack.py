"""The whole system on one machine, no cloud account: `make dev` runs this module.

- PostgreSQL: DATABASE_URL if set, else an embedded server (pgserver) with its data in .dev/pgdata;
  the migrations are applied either way.
- Cloud Tasks: gcloud-tasks-emulator from its own venv (.venv-emulator), spoken to by the real client.
- Twilio: the local SMS sink (shared.dev.sink), spoken to by the real twilio client; it posts signed
  status callbacks to twilio_status, so messages become delivered (or undelivered, when switched).
- Pub/Sub (when the Google Cloud CLI has the emulator): the sweep topic pushing into sweep_queue, and
  the stack's own pull subscriptions on the events and inbound topics, printed and kept in
  events.jsonl.
- The functions: functions-framework processes, one per entry point, with the production code.

Then it runs the demo (shared.dev.demo) and keeps everything up until Ctrl-C, which stops every
process it started. `LocalStack` is also what the end-to-end tests start, on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from shared.dev.tasks_emulator import TasksEmulator, free_port
from shared.store.migrate import apply_migrations

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIN = REPO_ROOT / "functions" / "main.py"
PROJECT = "local-project"
LOCATION = "local"
QUEUE = "message-delivery"
QUEUE_PATH = f"projects/{PROJECT}/locations/{LOCATION}/queues/{QUEUE}"
ACCOUNT_SID = "AC" + "d" * 32
AUTH_TOKEN = "local-dev-token"
FROM_NUMBER = "+15005550006"
SWEEP_TOPIC = "orchestrator-sweep"
SWEEP_SUBSCRIPTION = "orchestrator-sweep-push"
# entry point -> functions-framework signature type
EVENTS_TOPIC = "orchestrator-events"
INBOUND_TOPIC = "orchestrator-inbound"
# Pull subscriptions the stack reads itself: what agents would hear, printed and kept in events.jsonl.
EVENT_SUBSCRIPTIONS = {EVENTS_TOPIC: "orchestrator-events-dev", INBOUND_TOPIC: "orchestrator-inbound-dev"}
FUNCTIONS = {
    "schedule_message": "http",
    "deliver_message": "http",
    "sweep_queue": "cloudevent",
    "process_queue": "http",
    "health": "http",
    "twilio_inbound": "http",
    "twilio_status": "http",
}

log = logging.getLogger("dev")


@dataclass
class Ports:
    schedule: int = 8081
    deliver: int = 8082
    sweep: int = 8083
    process: int = 8084
    health: int = 8085
    sink: int = 8089
    tasks: int = 8123
    pubsub: int = 8086
    inbound: int = 8087
    status: int = 8088

    @classmethod
    def free(cls) -> Ports:
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})

    def of(self, function: str) -> int:
        return {
            "schedule_message": self.schedule,
            "deliver_message": self.deliver,
            "sweep_queue": self.sweep,
            "process_queue": self.process,
            "health": self.health,
            "twilio_inbound": self.inbound,
            "twilio_status": self.status,
        }[function]


@dataclass
class LocalStack:
    workdir: Path
    ports: Ports = field(default_factory=Ports)
    database_url: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    quiet: bool = False
    # None: the Pub/Sub emulator when the Google Cloud CLI has it, else a timer calling process_queue.
    use_pubsub: bool | None = None
    # Seconds between sweeps (Cloud Scheduler's "every minute"); 0: no scheduler.
    sweep_interval: float = 60.0

    def __post_init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._argv: dict[str, tuple[list[str], Mapping[str, str] | None]] = {}
        self._emulator: TasksEmulator | None = None
        self._pubsub: Any = None
        self._pg: Any = None
        self._scheduler: threading.Thread | None = None
        self._event_tail: threading.Thread | None = None
        self._stopping = threading.Event()
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            self._start_database()
            self._say(f"database     {self.printable_database_url}")
            self._emulator = TasksEmulator(
                QUEUE_PATH,
                port=self.ports.tasks,
                max_retries=20,
                log_path=self.workdir / "tasks-emulator.log",
            ).start()
            self._say(f"cloud tasks  emulator at {self._emulator.host}, queue {QUEUE_PATH}")
            self._spawn(
                "sms-sink",
                [
                    sys.executable,
                    "-m",
                    "shared.dev.sink",
                    "--port",
                    str(self.ports.sink),
                    "--record",
                    str(self.workdir / "sms.jsonl"),
                    # Twilio's receipts, signed as Twilio signs them: messages become delivered.
                    "--status-callbacks",
                    "--account-sid",
                    ACCOUNT_SID,
                    "--auth-token",
                    AUTH_TOKEN,
                ],
            )
            self._wait_http(f"{self.sink_url}/_sink/health", "sms-sink")
            self._say(f"sms sink     {self.sink_url} (recorded in {self.workdir / 'sms.jsonl'})")
            self._start_pubsub()
            for name, signature in FUNCTIONS.items():
                self._spawn(
                    name,
                    [
                        sys.executable,
                        "-m",
                        "functions_framework",
                        "--target",
                        name,
                        "--source",
                        str(MAIN),
                        "--signature-type",
                        signature,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.ports.of(name)),
                    ],
                    env=self.function_env(),
                )
            for name in FUNCTIONS:
                # Any HTTP answer means the server is up (GET on deliver answers 405).
                self._wait_http(self.url_of(name), name, any_status=True)
                self._say(f"function     {name:<16} {self.url_of(name)}")
            self._start_sweep_trigger()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=10)
            self._scheduler = None
        if self._event_tail is not None:
            self._event_tail.join(timeout=10)
            self._event_tail = None
        if self._pubsub is not None:
            self._pubsub.stop()
            self._pubsub = None
        for proc in reversed(list(self._procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; killing it", name)
                os.killpg(proc.pid, signal.SIGKILL)
        self._procs.clear()
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what the parts need -----------------------------------------------------------------

    def url_of(self, function: str) -> str:
        return f"http://127.0.0.1:{self.ports.of(function)}/"

    @property
    def embedded_database(self) -> bool:
        """True when the stack runs its own PostgreSQL (pgserver, .dev/pgdata), not DATABASE_URL's."""
        return self._pg is not None

    @property
    def printable_database_url(self) -> str:
        """The database URL without its password, still one psql takes."""
        return self._redacted(self.database_url or "")

    @property
    def pubsub_host(self) -> str | None:
        return self._pubsub.host if self._pubsub is not None else None

    def publish_sweep(self, **attributes: str) -> str:
        """What Cloud Scheduler does every minute: publish to the sweep topic."""
        from shared.dev.pubsub_emulator import publish

        assert self._pubsub is not None, "the Pub/Sub emulator is not running"
        return publish(self._pubsub.host, PROJECT, SWEEP_TOPIC, b'{"source": "scheduler"}', **attributes)

    @property
    def schedule_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.schedule}/"

    @property
    def deliver_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.deliver}/"

    @property
    def sink_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.sink}"

    def function_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "SUPABASE_"))}
        env.update(
            {
                "DATABASE_URL": self.database_url or "",
                "GOOGLE_CLOUD_PROJECT": PROJECT,
                "TASKS_LOCATION": LOCATION,
                "TASKS_QUEUE": QUEUE,
                "DELIVER_URL": self.deliver_url,
                "CLOUD_TASKS_EMULATOR_HOST": self._emulator.host if self._emulator else "",
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_PHONE_NUMBER": FROM_NUMBER,
                "TWILIO_API_BASE_URL": self.sink_url,
                "SWEEP_TOPIC": SWEEP_TOPIC,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("TASKS_SERVICE_ACCOUNT", None)  # the emulator has no OIDC
        env["STATUS_CALLBACK_URL"] = self.url_of("twilio_status")
        # Local only: the webhooks accept unsigned requests from loopback (curl experiments).
        env["TWILIO_SIGNATURE_BYPASS"] = "local-only"
        if self._pubsub is not None:
            env.update(
                {
                    "PUBSUB_EMULATOR_HOST": self._pubsub.host,
                    "EVENTS_TOPIC": EVENTS_TOPIC,
                    "INBOUND_TOPIC": INBOUND_TOPIC,
                }
            )
        else:
            for name in ("PUBSUB_EMULATOR_HOST", "EVENTS_TOPIC", "INBOUND_TOPIC"):
                env.pop(name, None)
        env.update(self.extra_env)
        return env

    def sink_messages(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.sink_url}/_sink/messages", timeout=5) as resp:
            data = json.load(resp)
        return list(data["messages"] if isinstance(data, dict) else data)

    def post_json(self, url: str, body: Any, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get_json(self, url: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    # -- faults (the chaos test) -------------------------------------------------------------

    def pid_of(self, name: str) -> int:
        """The pid of a process the stack started (a function's entry point, or "sms-sink"); it
        leads its own process group."""
        return self._procs[name].pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process's whole group (SIGKILL: no clean-up, as when an instance dies) and
        wait for it to be gone."""
        proc = self._procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=10)

    def stop_pubsub(self) -> None:
        """Stop the Pub/Sub emulator (an outage): the functions keep its address, and fail to reach it."""
        if self._pubsub is not None:
            self._pubsub.stop()

    def restart(self, name: str) -> None:
        """Kill the process (if it still runs), start it again as it was first started, and wait
        until it answers HTTP."""
        if self._procs[name].poll() is None:
            self.kill(name)
        argv, env = self._argv[name]
        self._spawn(name, argv, env=env)
        url = f"{self.sink_url}/_sink/health" if name == "sms-sink" else self.url_of(name)
        self._wait_http(url, name, any_status=name != "sms-sink")

    # -- internals ---------------------------------------------------------------------------

    def _start_pubsub(self) -> None:
        from shared.dev import pubsub_emulator as ps

        use_pubsub = ps.gcloud_available() if self.use_pubsub is None else self.use_pubsub
        if not use_pubsub:
            return
        self._pubsub = ps.PubSubEmulator(
            project=PROJECT, port=self.ports.pubsub, log_path=self.workdir / "pubsub-emulator.log"
        ).start()
        for topic in (SWEEP_TOPIC, EVENTS_TOPIC, INBOUND_TOPIC):
            ps.ensure_topic(self._pubsub.host, PROJECT, topic)
        # Subscribed before any function runs, so no event is published to a topic nobody reads.
        subscriptions = {
            topic: ps.ensure_pull_subscription(self._pubsub.host, PROJECT, topic, name)
            for topic, name in EVENT_SUBSCRIPTIONS.items()
        }
        self._event_tail = threading.Thread(
            target=self._tail_events, args=(subscriptions,), name="dev-events", daemon=True
        )
        self._event_tail.start()
        self._say(f"events       {', '.join(subscriptions.values())} -> {self.events_path}")

    @property
    def events_path(self) -> Path:
        """Every event and inbound message the stack's own subscriptions received, a JSON line each."""
        return self.workdir / "events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def _tail_events(self, subscriptions: Mapping[str, str]) -> None:
        from shared.dev import pubsub_emulator as ps

        assert self._pubsub is not None
        client = ps.subscriber_client(self._pubsub.host)
        try:
            while not self._stopping.is_set():
                for topic, subscription in subscriptions.items():
                    try:
                        pulled = ps.pull(client, subscription, timeout=1.0)
                    except Exception as exc:  # the emulator stopped (an outage test): try again
                        log.debug("pulling %s failed: %s", subscription, exc)
                        self._stopping.wait(1.0)
                        continue
                    for message in pulled:
                        self._record_event(topic, message)
        finally:
            client.transport.close()

    def _record_event(self, topic: str, message: Any) -> None:
        try:
            data: Any = json.loads(message.data)
        except ValueError:
            data = message.data.decode(errors="replace")
        entry = {
            "topic": topic,
            "messageId": message.message_id,
            "publishTime": message.publish_time,
            "attributes": message.attributes,
            "data": data,
        }
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        attrs = message.attributes
        kind = attrs.get("eventType") or topic
        who = " ".join(f"{k}={attrs[k]}" for k in ("userId", "agentId", "agentType") if attrs.get(k))
        self._say(f"event        {kind:<18} {who}")

    def _start_sweep_trigger(self) -> None:
        from shared.dev import pubsub_emulator as ps

        if self._pubsub is not None:
            endpoint = ps.push_endpoint_for(self.url_of("sweep_queue").rstrip("/"), PROJECT, SWEEP_TOPIC)
            ps.ensure_push_subscription(
                self._pubsub.host, PROJECT, SWEEP_TOPIC, SWEEP_SUBSCRIPTION, endpoint, ack_deadline_seconds=60
            )
            self._say(
                f"pub/sub      emulator at {self._pubsub.host}, topic {SWEEP_TOPIC} pushes to sweep_queue"
            )
        else:
            self._say(
                f"pub/sub      no Google Cloud CLI: process_queue is called every {self.sweep_interval:.0f} s"
            )
        if self.sweep_interval <= 0:
            return

        def tick() -> None:
            # The first sweep at once: health answers sweep_stale until one has run, and the data of
            # an earlier run may hold overdue rows.
            while True:
                try:
                    if self._pubsub is not None:
                        self.publish_sweep()
                    else:
                        self.post_json(self.url_of("process_queue"), {})
                except Exception as exc:  # a missed tick is retried at the next one
                    log.warning("sweep trigger failed: %s", exc)
                if self._stopping.wait(self.sweep_interval):
                    return

        self._scheduler = threading.Thread(target=tick, name="dev-scheduler", daemon=True)
        self._scheduler.start()

    def _start_database(self) -> None:
        if not self.database_url:
            import pgserver

            self._pg = pgserver.get_server(str(self.workdir / "pgdata"), cleanup_mode="stop")
            admin = self._pg.get_uri("postgres")
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                exists = conn.execute("select 1 from pg_database where datname = 'orchestrator'").fetchone()
                if not exists:
                    conn.execute("create database orchestrator")
            self.database_url = self._pg.get_uri("orchestrator")
        assert self.database_url is not None
        applied = apply_migrations(self.database_url)
        if applied:
            self._say(f"migrations   applied {', '.join(applied)}")

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        self._argv[name] = (argv, env)
        out = (self.workdir / f"{name}.log").open("ab")
        self._procs[name] = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=dict(env or os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() takes its children too
        )

    def _wait_http(self, url: str, name: str, *, any_status: bool = False, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.workdir / (name + '.log')}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                if any_status:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not answer at {url} within {timeout:.0f} s; see {self.workdir}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    @staticmethod
    def _redacted(url: str) -> str:
        """The URL without its password, still one psql takes (`psql 'postgresql://postgres@/db?host=...'`)."""
        parts = urllib.parse.urlsplit(url)
        if "@" not in parts.netloc:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[-1]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the message orchestrator locally and show it working.")
    parser.add_argument("--workdir", default=str(REPO_ROOT / ".dev"), help="state and logs (default .dev/)")
    parser.add_argument("--no-demo", action="store_true", help="start the stack without the demo")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo has run")
    parser.add_argument(
        "--free-ports", action="store_true", help="pick free ports instead of 8081/8082/8089/8123"
    )
    args = parser.parse_args(argv)

    stack = LocalStack(
        Path(args.workdir),
        ports=Ports.free() if args.free_ports else Ports(),
        database_url=os.environ.get("DATABASE_URL") or None,
    )
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background ignores SIGINT, and Python
    # then never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("Starting the local stack (Ctrl-C stops everything) ...", flush=True)
    try:
        stack.start()
        if not args.no_demo:
            from shared.dev.demo import run_demo

            run_demo(stack)
        if args.exit_after_demo:
            return 0
        print("\nEverything is running. Logs are in", stack.workdir, "- Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
    finally:
        stack.stop()
        print("Stopped every process the stack started.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
