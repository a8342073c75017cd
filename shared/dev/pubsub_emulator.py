"""Run Google's Pub/Sub emulator (`gcloud beta emulators pubsub start`) as a subprocess, for tests and
`make dev`, and talk to it with the real google-cloud-pubsub clients.

The emulator is the `pubsub-emulator` component of the Google Cloud CLI (0.8.20 with gcloud 528 on
these machines): a Java program (`<sdk>/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar`),
so it needs Java on PATH or in JAVA_HOME. What it does, and what that means here:

- Command line: `gcloud beta emulators pubsub start --host-port=127.0.0.1:PORT --data-dir=DIR
  --project=P --quiet`. gcloud writes `DIR/env.yaml` (PUBSUB_EMULATOR_HOST) and then runs
  `<sdk>/platform/pubsub-emulator/bin/cloud-pubsub-emulator --host=127.0.0.1 --port=PORT`, which runs
  `java -jar ...`. Neither `--project` nor `--data-dir` reaches Java: state is in memory only, and
  any project name is accepted. `--quiet` keeps gcloud from prompting (e.g. to install a missing
  component). Output lines are prefixed `[pubsub] `; ready is `INFO: Server started, listening on
  PORT`, after about 2.5 s here (most of it the JVM).
- The port serves gRPC and plain HTTP/1.1 (`GET /` answers `Ok`). Readiness below waits for the
  "listening" line *and* a real `ListTopics` through the real client.
- When the port is taken, Java prints `java.net.BindException: Address already in use` and then
  keeps running, serving nothing, and so does gcloud. The start-up wait looks for that line, so a
  clash fails (or, with a picked port, re-picks) at once instead of timing out.
- gcloud is a Python process whose child is Java. SIGTERM to gcloud alone leaves Java running as an
  orphan, and gcloud moves itself into a new process group unless it leads its session
  (googlecloudsdk/command_lib/emulators/util.py: `os.setpgid(0, 0)`), so a group started around it
  does not hold it. So gcloud is started as the leader of a session of its own (its group = gcloud +
  Java), under a tiny supervisor that ends that group (SIGTERM, SIGKILL after a grace period; Java
  needs 1-2 s to go) when `stop()` signals it, and also when the process that started it is gone (a
  killed pytest run or dev stack would otherwise leave Java running).
- Resource names are validated like the real service: a topic or subscription ID must be 3-255
  characters and start with a letter (`projects/p/topics/t1` is INVALID_ARGUMENT).
- Push subscriptions: the emulator POSTs `Content-Type: application/json`, no Authorization header
  (no OIDC), body
  `{"subscription": "projects/P/subscriptions/S", "message": {"data": "<base64>",
  "attributes": {...}, "messageId": "N", "message_id": "N", "publishTime": "...",
  "publish_time": "..."}}`. `attributes` is present (`{}`) even when the message has none, and `data`
  is present (`""`) for an attributes-only message. Message IDs are "1", "2", ... per emulator.
  Concurrent messages are pushed in no particular order. A non-2xx answer is retried about every
  second (no exponential backoff); a push that is not answered within the subscription's ack
  deadline (default 10 s, `ack_deadline_seconds` below) is pushed again while the first is still
  running (seen: 13 s handler, second push at 10.0 s).
- Publishing a message with neither data nor attributes fails with INVALID_ARGUMENT ("Some messages
  are empty"), as in production.

functions-framework (3.8-3.10) turns such a raw push body into a CloudEvent of type
`google.cloud.pubsub.topic.v1.messagePublished` when the body has `subscription`, `message.data` and
`message.messageId` (`attributes` defaults to `{}`). The CloudEvent's source is
`//pubsub.googleapis.com/` followed by the first `projects/P/topics/T` found in the *request path*,
so point the push endpoint at `http://HOST:PORT/projects/P/topics/T` (push_endpoint_for() builds
it) to get the same source as Eventarc in production; a push to `/` gives the bare
`//pubsub.googleapis.com/`. tests/integration/test_pubsub_push.py proves this path.

The helpers (ensure_topic, ensure_push_subscription, publish) build the real clients on a plaintext
gRPC channel to the emulator (publisher_client(host), subscriber_client(host)); they never read or
set PUBSUB_EMULATOR_HOST, so nothing leaks into the rest of the process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

GCLOUD_ENV = "PUBSUB_EMULATOR_GCLOUD"
DEFAULT_PROJECT = "local-project"
PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"

_LISTENING_RE = re.compile(r"Server started, listening on (\d+)")
_BIND_FAILED = "Address already in use"

# Started in a session of its own; runs gcloud in a further session (see the module docstring for why),
# writes gcloud's pid (= its process group: gcloud and Java) to a file, and ends that group (SIGTERM,
# then SIGKILL) when told to stop (SIGTERM/SIGINT), when gcloud exits, or when the process that
# started it is gone. It exits only once the group is empty, or after the SIGKILL grace period.
_SUPERVISOR = """
import os, signal, subprocess, sys, time

parent, pid_file, grace = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
child = subprocess.Popen(sys.argv[4:], stdin=subprocess.DEVNULL, start_new_session=True)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(child.pid))
os.replace(pid_file + ".tmp", pid_file)

def group_alive():
    child.poll()  # reap gcloud, or its zombie keeps the group alive
    try:
        os.killpg(child.pid, 0)
    except ProcessLookupError:
        return False
    return True

while child.poll() is None and not stop and os.getppid() == parent:
    time.sleep(0.1)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + grace
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
code = child.poll()
sys.exit(code if code and code > 0 else 0)
"""


class EmulatorError(RuntimeError):
    """The Pub/Sub emulator could not be started."""


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_gcloud() -> Path | None:
    """The gcloud executable: $PUBSUB_EMULATOR_GCLOUD, else `gcloud` on PATH."""
    configured = os.environ.get(GCLOUD_ENV)
    if configured:
        return Path(configured) if Path(configured).exists() else None
    found = shutil.which("gcloud")
    return Path(found) if found else None


def _sdk_root(gcloud: Path) -> Path | None:
    # <sdk>/bin/gcloud, usually reached through a symlink such as /usr/bin/gcloud.
    root = gcloud.resolve().parent.parent
    if (root / "platform").is_dir() or (root / "lib" / "gcloud.py").exists():
        return root
    try:
        out = subprocess.run(
            [str(gcloud), "info", "--format=value(installation.sdk_root)", "--quiet"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _java() -> Path | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java")
    return Path(found) if found else None


def missing_reason(gcloud: str | os.PathLike[str] | None = None) -> str | None:
    """Why the emulator cannot be started here (gcloud, its pubsub-emulator component, Java), or None."""
    configured = os.environ.get(GCLOUD_ENV)
    if gcloud is None and configured and not Path(configured).exists():
        return f"${GCLOUD_ENV} is {configured}, which does not exist"
    path = Path(gcloud) if gcloud is not None else find_gcloud()
    if path is None or not path.exists():
        return (
            f"the Google Cloud CLI (gcloud) is not installed: not on PATH and ${GCLOUD_ENV} not set "
            "(https://cloud.google.com/sdk/docs/install)"
        )
    root = _sdk_root(path)
    emulator = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator" if root else None
    if emulator is None or not emulator.exists():
        return (
            f"the Pub/Sub emulator component of gcloud ({path}) is not installed: run "
            "`gcloud components install pubsub-emulator` (or apt-get install "
            "google-cloud-cli-pubsub-emulator)"
        )
    if _java() is None:
        return "the Pub/Sub emulator needs Java (JRE 8 or newer): no `java` on PATH or in $JAVA_HOME"
    return None


def gcloud_available() -> bool:
    """True when gcloud, its pubsub-emulator component and Java are all installed."""
    return missing_reason() is None


class PubSubEmulator:
    """A running Pub/Sub emulator; `.host` ("127.0.0.1:PORT") is PUBSUB_EMULATOR_HOST for it.

    >>> with PubSubEmulator(project="p") as emulator:
    ...     ensure_topic(emulator.host, "p", "sweep")
    """

    def __init__(
        self,
        *,
        project: str = DEFAULT_PROJECT,
        port: int | None = None,
        gcloud: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.project = project
        self._requested_port = port
        self.port: int | None = port
        self._gcloud = Path(gcloud) if gcloud is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._log_path = Path(log_path) if log_path is not None else None
        self._owns_log = False
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        if self.port is None:
            raise EmulatorError("the emulator has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def data_dir(self) -> Path | None:
        return Path(self._tmp.name) / "data" if self._tmp is not None else None

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this emulator."""
        return {"PUBSUB_EMULATOR_HOST": self.host, "GOOGLE_CLOUD_PROJECT": self.project}

    def output(self, *, since: int = 0) -> str:
        """What gcloud and the emulator have printed so far (stdout and stderr), from byte `since`."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def start(self) -> Self:
        if self.running:
            return self
        gcloud = self._gcloud or find_gcloud()
        reason = missing_reason(gcloud)
        if reason is not None or gcloud is None:
            raise EmulatorError(reason or "gcloud not found")
        self._tmp = tempfile.TemporaryDirectory(prefix="pubsub-emulator-")
        if self._log_path is None:
            self._log_path = Path(self._tmp.name) / "emulator.log"
            self._owns_log = True
        # A picked port can be taken between picking and binding; pick again then.
        attempts = 3 if self._requested_port is None else 1
        try:
            for attempt in range(1, attempts + 1):
                self.port = self._requested_port or free_port()
                self._spawn(gcloud)
                try:
                    self._wait_ready()
                    break
                except _PortTaken:
                    self._kill()
                    if attempt == attempts:
                        raise EmulatorError(
                            f"the Pub/Sub emulator could not bind {self.host}: address already in use; "
                            f"its output:\n{self.output()}"
                        ) from None
        except BaseException:
            self._kill()
            self._cleanup()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._kill()
        self._cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, gcloud: Path) -> None:
        assert self._log_path is not None and self.port is not None and self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()
        args = [
            sys.executable,
            "-c",
            _SUPERVISOR,
            str(os.getpid()),
            str(self._pid_file),
            str(self.stop_timeout),
            str(gcloud),
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port={self.host}",
            f"--project={self.project}",
            f"--data-dir={self.data_dir}",
            "--quiet",
        ]
        # gcloud runs on its own bundled Python: keep this venv's settings away from it.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PUBSUB_EMULATOR_HOST"}
        }
        env["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"
        env["CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK"] = "1"
        env["CLOUDSDK_CORE_DISABLE_USAGE_REPORTING"] = "1"
        # A file, not a pipe: nobody drains a pipe while tests run, and a full pipe would block the
        # emulator (it logs a line per push connection).
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._tmp.name if self._tmp is not None else None,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        client: pubsub_v1.PublisherClient | None = None
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise EmulatorError(
                        f"the Pub/Sub emulator exited with status {self._proc and self._proc.returncode} "
                        f"during start-up on {self.host}:\n{self.output()}"
                    )
                out = self.output(since=self._log_offset)
                if _BIND_FAILED in out:
                    raise _PortTaken
                # Until our Java has bound the port, an answer could come from someone else's server.
                if not any(int(m) == self.port for m in _LISTENING_RE.findall(out)):
                    time.sleep(0.05)
                    continue
                try:
                    if client is None:
                        client = publisher_client(self.host)
                    # A real call through the real client: the server speaks Pub/Sub gRPC.
                    list(client.list_topics(request={"project": f"projects/{self.project}"}, timeout=2.0))
                    return
                except Exception as exc:
                    last_error = exc
                    time.sleep(0.1)
        finally:
            if client is not None:
                _close(client)
        raise EmulatorError(
            f"the Pub/Sub emulator did not answer on {self.host} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error!r}); its output:\n{self.output()}"
        )

    @property
    def _pid_file(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "gcloud.pid"

    def _gcloud_pgid(self) -> int | None:
        try:
            return int(self._pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # The supervisor ends gcloud's process group (gcloud and Java) and exits once it is empty.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=2 * self.stop_timeout + 5)
            return
        except subprocess.TimeoutExpired:
            pass
        # It is stuck: end it and the group ourselves. The group is still alive (the supervisor waits
        # for it), so its id cannot have been reused by anyone else.
        pgid = self._gcloud_pgid()
        proc.kill()
        proc.wait(timeout=5)
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    def _cleanup(self) -> None:
        if self._owns_log:
            self._log_path = None
            self._owns_log = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _PortTaken(Exception):
    pass


# --- the real clients, pointed at an emulator --------------------------------------------------------


def publisher_client(host: str) -> pubsub_v1.PublisherClient:
    """The real PublisherClient on a plaintext gRPC channel to `host`; no env var read or set.

    Passing a transport instance bypasses both credentials and PUBSUB_EMULATOR_HOST.
    """
    import grpc
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    transport = PublisherGrpcTransport(channel=grpc.insecure_channel(host))
    return pubsub_v1.PublisherClient(transport=transport)


def subscriber_client(host: str) -> pubsub_v1.SubscriberClient:
    """The real SubscriberClient on a plaintext gRPC channel to `host`; no env var read or set."""
    import grpc
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    transport = SubscriberGrpcTransport(channel=grpc.insecure_channel(host))
    return pubsub_v1.SubscriberClient(transport=transport)


def _close(client: pubsub_v1.PublisherClient | pubsub_v1.SubscriberClient) -> None:
    from google.cloud import pubsub_v1

    if isinstance(client, pubsub_v1.PublisherClient):
        client.stop()  # ends the batching thread
    client.transport.close()  # closes the channel we made


@contextlib.contextmanager
def _publisher(host: str) -> Iterator[pubsub_v1.PublisherClient]:
    client = publisher_client(host)
    try:
        yield client
    finally:
        _close(client)


@contextlib.contextmanager
def _subscriber(host: str) -> Iterator[pubsub_v1.SubscriberClient]:
    client = subscriber_client(host)
    try:
        yield client
    finally:
        _close(client)


def topic_path(project: str, topic: str) -> str:
    return f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    return f"projects/{project}/subscriptions/{subscription}"


def push_endpoint_for(base_url: str, project: str, topic: str) -> str:
    """`base_url` + `/projects/P/topics/T`: the path functions-framework takes the CloudEvent source from."""
    return urllib.parse.urljoin(base_url.rstrip("/") + "/", topic_path(project, topic))


def ensure_topic(host: str, project: str, topic: str) -> str:
    """Create the topic unless it exists; returns its path `projects/P/topics/T`."""
    from google.api_core.exceptions import AlreadyExists

    name = topic_path(project, topic)
    with _publisher(host) as client, contextlib.suppress(AlreadyExists):
        client.create_topic(name=name, timeout=10.0)
    return name


def ensure_push_subscription(
    host: str,
    project: str,
    topic: str,
    subscription: str,
    push_endpoint: str,
    *,
    attributes: Mapping[str, str] | None = None,
    ack_deadline_seconds: int | None = None,
) -> str:
    """A push subscription on `topic` (created if missing) that POSTs to `push_endpoint`.

    An existing subscription of that name gets this endpoint and these push attributes (so a dev stack
    restarted on another port keeps working); one on another topic is deleted and re-created.
    `attributes` are PushConfig attributes (e.g. {"x-goog-version": "v1"}), not message attributes.
    `ack_deadline_seconds` is how long a push may take before the emulator redelivers (default 10).
    Returns the subscription path `projects/P/subscriptions/S`.
    """
    from google.api_core.exceptions import AlreadyExists, NotFound
    from google.pubsub_v1.types import PushConfig, Subscription

    topic_name = topic_path(project, topic)
    name = subscription_path(project, subscription)
    push_config = PushConfig(push_endpoint=push_endpoint, attributes=dict(attributes or {}))
    wanted = Subscription(name=name, topic=topic_name, push_config=push_config)
    if ack_deadline_seconds is not None:
        wanted.ack_deadline_seconds = ack_deadline_seconds
    with _subscriber(host) as client:
        try:
            existing = client.get_subscription(subscription=name, timeout=10.0)
        except NotFound:
            existing = None
        if existing is not None and existing.topic != topic_name:
            client.delete_subscription(subscription=name, timeout=10.0)
            existing = None
        if existing is None:
            with contextlib.suppress(AlreadyExists):
                client.create_subscription(request=wanted, timeout=10.0)
                return name
        client.modify_push_config(subscription=name, push_config=push_config, timeout=10.0)
    return name


def ensure_pull_subscription(host: str, project: str, topic: str, subscription: str) -> str:
    """A pull subscription on `topic`, created unless one of that name exists; returns its path."""
    from google.api_core.exceptions import AlreadyExists

    name = subscription_path(project, subscription)
    with _subscriber(host) as client, contextlib.suppress(AlreadyExists):
        client.create_subscription(request={"name": name, "topic": topic_path(project, topic)}, timeout=10.0)
    return name


@dataclass(frozen=True)
class Pulled:
    """One message taken (and acknowledged) from a pull subscription."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: str


def pull(
    client: pubsub_v1.SubscriberClient, subscription: str, *, max_messages: int = 100, timeout: float = 2.0
) -> list[Pulled]:
    """One synchronous pull, acknowledged at once: an empty list when nothing came within `timeout`."""
    from google.api_core.exceptions import DeadlineExceeded

    try:
        response = client.pull(
            request={"subscription": subscription, "max_messages": max_messages}, timeout=timeout
        )
    except DeadlineExceeded:
        return []
    received = list(response.received_messages)
    if received:
        client.acknowledge(
            request={"subscription": subscription, "ack_ids": [r.ack_id for r in received]}, timeout=10.0
        )
    return [
        Pulled(
            message_id=r.message.message_id,
            data=bytes(r.message.data),
            attributes=dict(r.message.attributes),
            publish_time=r.message.publish_time.isoformat(),
        )
        for r in received
    ]


def publish(host: str, project: str, topic: str, data: bytes, /, **attributes: str) -> str:
    """Publish one message (keyword arguments are its attributes) and return its message ID.

    Uses the GAPIC `google.pubsub_v1.PublisherClient.publish` (one synchronous Publish call, no
    batching thread), so any attribute name works, `topic` and `data` included.
    """
    import grpc
    from google.pubsub_v1 import PublisherClient, PubsubMessage
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    client = PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host)))
    try:
        response = client.publish(
            topic=topic_path(project, topic),
            messages=[PubsubMessage(data=data, attributes=attributes)],
            timeout=10.0,
        )
        message_id: str = response.message_ids[0]
        return message_id
    finally:
        client.transport.close()  # type: ignore[no-untyped-call]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """`python -m shared.dev.pubsub_emulator [PROJECT [PORT]]`: run in the foreground until Ctrl-C."""
    if len(sys.argv) > 1 and sys.argv[1] in {"-h", "--help"}:
        print(__doc__)
        sys.exit(0)
    reason = missing_reason()
    if reason is not None:
        print(f"cannot start the Pub/Sub emulator: {reason}", file=sys.stderr)
        sys.exit(1)
    # Python dies on SIGTERM without unwinding; this lets the `with` below stop the emulator.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    project = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PROJECT
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    with PubSubEmulator(project=project, port=port) as emulator:
        print(
            f"Pub/Sub emulator on {emulator.host} (project {emulator.project}), log {emulator.log_path}\n"
            f"export PUBSUB_EMULATOR_HOST={emulator.host}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while emulator.running:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
