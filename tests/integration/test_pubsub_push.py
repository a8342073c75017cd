"""Pub/Sub push into a functions-framework CloudEvent function, with real processes throughout.

This is the local form of Cloud Scheduler → Pub/Sub → sweep_queue: Google's Pub/Sub emulator (Java,
started by gcloud) pushes to a real `python -m functions_framework --signature-type cloudevent`
process running tests/data/pubsub_probe/main.py, which appends what it received to a JSON-lines file.
Topics, subscriptions and messages go through the real google-cloud-pubsub clients.

What the emulator (pubsub-emulator 0.8.20) pushes, as POST with `Content-Type: application/json` and
no Authorization header:

    {"subscription": "projects/P/subscriptions/S",
     "message": {"data": "<base64>", "attributes": {...}, "messageId": "7", "message_id": "7",
                 "publishTime": "2026-...Z", "publish_time": "2026-...Z"}}

`attributes` is there (`{}`) when the message has none, and `data` is there (`""`) for an
attributes-only message.

What functions-framework (3.8 to 3.10.2, event_conversion.py) needs to turn that raw push body into a
CloudEvent: a JSON body with `subscription`, `message.data` and `message.messageId`. `attributes` is
optional (it defaults to `{}`; design.md's "needs message.attributes" does not hold for these
versions, and the emulator sends it anyway). Without `data` or `messageId` or `subscription` the
function is not called and the answer is 400, which Pub/Sub would retry forever. The resulting
CloudEvent: type `google.cloud.pubsub.topic.v1.messagePublished`, id = messageId, time = publishTime,
no subject, source `//pubsub.googleapis.com/` + the first `projects/P/topics/T` in the *request path*
(so the push endpoint must end in `/projects/P/topics/T` to get the source Eventarc gives in
production; a push to `/` gives `//pubsub.googleapis.com/`), data
`{"message": {"@type": "type.googleapis.com/google.pubsub.v1.PubsubMessage", "data", "attributes",
"messageId", "publishTime"}}`: unlike Eventarc's, no `subscription` key and no `deliveryAttempt`.
An exception in the function answers 500, and the emulator pushes the message again about a second
later.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.api_core.exceptions import InvalidArgument

from shared.dev.pubsub_emulator import (
    PUBSUB_EVENT_TYPE,
    PubSubEmulator,
    ensure_push_subscription,
    ensure_topic,
    free_port,
    publish,
    push_endpoint_for,
)
from tests.integration.pubsub_fixtures import PUBSUB_TEST_PROJECT

pytestmark = [pytest.mark.xdist_group("pubsub")]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_SOURCE = REPO_ROOT / "tests" / "data" / "pubsub_probe" / "main.py"
PROJECT = PUBSUB_TEST_PROJECT
DELIVERY_WAIT = 5.0
Record = dict[str, Any]


def _read_jsonl(path: Path) -> list[Record]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_until(what: str, check: Callable[[], list[Record]], count: int, timeout: float) -> list[Record]:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) >= count, f"{what}: wanted {count} within {timeout} s, got {found!r}"
    return found


@dataclass
class ProbeFunction:
    """The functions-framework process running the probe; `records()` is what it has received."""

    url: str
    out: Path
    log: Path

    def records(self, message_id: str | None = None) -> list[Record]:
        found = _read_jsonl(self.out)
        return [r for r in found if message_id is None or r["message_id"] == message_id]

    def wait_for(self, message_id: str, count: int = 1, timeout: float = DELIVERY_WAIT) -> list[Record]:
        return _wait_until(
            f"probe records of message {message_id} (function log: {self.log})",
            lambda: self.records(message_id),
            count,
            timeout,
        )

    def post(self, path: str, body: object) -> int:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as error:
            return error.code


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProbeFunction]:
    directory = tmp_path_factory.mktemp("pubsub-probe")
    out, log = directory / "events.jsonl", directory / "functions-framework.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    env["PUBSUB_PROBE_OUT"] = str(out)
    args = [
        sys.executable,
        "-m",
        "functions_framework",
        "--target",
        "on_event",
        "--source",
        str(PROBE_SOURCE),
        "--signature-type",
        "cloudevent",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("ab") as log_file:
        # Its own process group: gunicorn forks a worker, and stopping must reach it too.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    function = ProbeFunction(url=f"http://127.0.0.1:{port}", out=out, log=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"functions-framework exited with {proc.returncode}:\n{log.read_text()}")
            try:
                # Any HTTP answer (a GET is 405 here) means the worker serves requests.
                with urllib.request.urlopen(function.url + "/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"functions-framework did not answer on {function.url}:\n{log.read_text()}")
                time.sleep(0.05)
        yield function
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@dataclass(frozen=True)
class Push:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Record:
        data: Record = json.loads(self.body)
        return data


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[Push]]]:
    """An HTTP server in this process that records raw push requests and answers 204."""
    pushes: list[Push] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            pushes.append(Push({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", pushes
    finally:
        server.shutdown()
        server.server_close()


def _topic_with_push(emulator: PubSubEmulator, push_endpoint: str) -> str:
    """A fresh topic (IDs must be 3-255 chars and start with a letter) with one push subscription."""
    suffix = uuid.uuid4().hex[:10]
    topic = f"topic-{suffix}"
    ensure_topic(emulator.host, PROJECT, topic)
    ensure_push_subscription(emulator.host, PROJECT, topic, f"push-{suffix}", push_endpoint)
    return topic


def _topic_to_probe(emulator: PubSubEmulator, probe: ProbeFunction) -> str:
    suffix = uuid.uuid4().hex[:10]
    topic = f"topic-{suffix}"
    ensure_topic(emulator.host, PROJECT, topic)
    endpoint = push_endpoint_for(probe.url, PROJECT, topic)
    ensure_push_subscription(emulator.host, PROJECT, topic, f"push-{suffix}", endpoint)
    return topic


def test_published_message_arrives_as_a_message_published_cloudevent(
    pubsub_emulator: PubSubEmulator, probe: ProbeFunction
) -> None:
    topic = _topic_to_probe(pubsub_emulator, probe)
    payload = json.dumps({"job": "sweep"}).encode()

    started = time.monotonic()
    message_id = publish(pubsub_emulator.host, PROJECT, topic, payload, origin="scheduler", kind="sweep")
    [record] = probe.wait_for(message_id)
    latency = time.monotonic() - started

    assert record["type"] == PUBSUB_EVENT_TYPE == "google.cloud.pubsub.topic.v1.messagePublished"
    assert record["source"] == f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{topic}"
    assert record["subject"] is None
    assert record["id"] == message_id
    assert record["data"] == payload.decode()
    assert record["attributes"] == {"origin": "scheduler", "kind": "sweep"}
    assert record["time"] == record["publish_time"]
    assert record["data_keys"] == ["message"]
    assert record["message_keys"] == ["@type", "attributes", "data", "messageId", "publishTime"]
    assert record["outcome"] == "ok"
    assert latency < DELIVERY_WAIT


def test_message_without_attributes_still_converts(
    pubsub_emulator: PubSubEmulator, probe: ProbeFunction
) -> None:
    topic = _topic_to_probe(pubsub_emulator, probe)

    message_id = publish(pubsub_emulator.host, PROJECT, topic, b"tick")
    [record] = probe.wait_for(message_id)

    assert record["type"] == PUBSUB_EVENT_TYPE
    assert record["data"] == "tick"
    assert record["attributes"] == {}


def test_attributes_only_message_converts_with_empty_data(
    pubsub_emulator: PubSubEmulator, probe: ProbeFunction
) -> None:
    topic = _topic_to_probe(pubsub_emulator, probe)

    message_id = publish(pubsub_emulator.host, PROJECT, topic, b"", kind="sweep")
    [record] = probe.wait_for(message_id)

    assert record["type"] == PUBSUB_EVENT_TYPE
    assert record["data_b64"] == ""
    assert record["attributes"] == {"kind": "sweep"}
    # A message with neither data nor attributes is refused at publish time, as in production.
    with pytest.raises(InvalidArgument, match="empty"):
        publish(pubsub_emulator.host, PROJECT, topic, b"")


def test_failed_push_is_pushed_again(pubsub_emulator: PubSubEmulator, probe: ProbeFunction) -> None:
    topic = _topic_to_probe(pubsub_emulator, probe)

    message_id = publish(pubsub_emulator.host, PROJECT, topic, b"retry me", probe_fail_attempts="1")
    failed, delivered = probe.wait_for(message_id, count=2)

    assert (failed["outcome"], delivered["outcome"]) == ("failed", "ok")
    assert delivered["data"] == "retry me"
    time.sleep(0.3)
    assert len(probe.records(message_id)) == 2  # a 2xx ends it


def test_emulator_push_body_shape(pubsub_emulator: PubSubEmulator, recorder: tuple[str, list[Push]]) -> None:
    url, pushes = recorder
    topic = _topic_with_push(pubsub_emulator, url + "/projects/any/topics/path")

    plain = publish(pubsub_emulator.host, PROJECT, topic, b"plain")
    with_attributes = publish(pubsub_emulator.host, PROJECT, topic, b"attrs", a="1")
    attributes_only = publish(pubsub_emulator.host, PROJECT, topic, b"", a="2")
    _wait_until("raw pushes", lambda: [p.json for p in pushes], 3, DELIVERY_WAIT)

    by_id = {p.json["message"]["messageId"]: p for p in pushes}
    assert set(by_id) == {plain, with_attributes, attributes_only}  # pushed in no particular order
    for push in pushes:
        assert push.headers["content-type"] == "application/json"
        assert "authorization" not in push.headers  # no OIDC token from the emulator
        body = push.json
        assert set(body) == {"subscription", "message"}
        assert body["subscription"].startswith(f"projects/{PROJECT}/subscriptions/push-")
        assert {"data", "attributes", "messageId", "publishTime"} <= set(body["message"])
    assert by_id[plain].json["message"]["attributes"] == {}  # present even when empty
    assert by_id[plain].json["message"]["data"] == base64.b64encode(b"plain").decode()
    assert by_id[with_attributes].json["message"]["attributes"] == {"a": "1"}
    assert by_id[attributes_only].json["message"]["data"] == ""  # present even when empty


def _raw_push(message: Record) -> Record:
    return {"subscription": f"projects/{PROJECT}/subscriptions/hand-made", "message": message}


@pytest.mark.parametrize(
    ("case", "body", "status"),
    [
        ("complete", _raw_push({"data": "aGk=", "attributes": {"a": "b"}, "messageId": "m-complete"}), 200),
        ("no attributes", _raw_push({"data": "aGk=", "messageId": "m-no-attributes"}), 200),
        ("no data", _raw_push({"attributes": {"a": "b"}, "messageId": "m-no-data"}), 400),
        ("no messageId", _raw_push({"data": "aGk=", "attributes": {}}), 400),
        ("no subscription", {"message": {"data": "aGk=", "attributes": {}, "messageId": "m-no-sub"}}, 400),
    ],
)
def test_functions_framework_conversion_needs_subscription_data_and_message_id(
    probe: ProbeFunction, case: str, body: Record, status: int
) -> None:
    # What the function process itself accepts as a raw push body, independent of the emulator.
    assert probe.post(f"/projects/{PROJECT}/topics/hand-made", body) == status, case
    message_id = body.get("message", {}).get("messageId")
    if status == 200:
        [record] = probe.wait_for(message_id, timeout=1)
        assert record["type"] == PUBSUB_EVENT_TYPE
        assert record["source"] == f"//pubsub.googleapis.com/projects/{PROJECT}/topics/hand-made"
        assert record["attributes"] == body["message"].get("attributes", {})
    elif message_id is not None:
        assert probe.records(message_id) == []


def test_push_to_the_root_path_gives_a_bare_source(probe: ProbeFunction) -> None:
    body = _raw_push({"data": "aGk=", "attributes": {}, "messageId": "m-root"})
    assert probe.post("/", body) == 200
    [record] = probe.wait_for("m-root", timeout=1)
    assert record["source"] == "//pubsub.googleapis.com/"
