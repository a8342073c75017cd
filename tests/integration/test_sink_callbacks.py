"""The SMS sink's status callbacks, as Twilio's: the fields Twilio posts, signed so that twilio's own
RequestValidator accepts them, and the outcome switch (per number, then cleared)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from shared.dev.sink import SmsSink

SID = "AC" + "e" * 32
TOKEN = "sink-callback-token"


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, dict[str, str], str]] = []
        self.arrived = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/status?message_id=m-1"

    def wait(self, count: int) -> list[tuple[str, dict[str, str], str]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout=5), self.received
            return list(self.received)


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
        with self.server.arrived:
            self.server.received.append((url, dict(parse_qsl(body)), self.headers["X-Twilio-Signature"]))
            self.server.arrived.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sink() -> Iterator[SmsSink]:
    with SmsSink(account_sid=SID, auth_token=TOKEN, status_callbacks=True, callback_delay=0.01) as s:
        yield s


def _send(sink: SmsSink, to: str, callback: str) -> str:
    client = Client(SID, TOKEN)
    client.api.base_url = sink.url
    message = client.messages.create(to=to, from_="+15005550006", body="hi", status_callback=callback)
    return str(message.sid)


def test_a_sent_message_gets_signed_sent_then_delivered_callbacks(sink: SmsSink, receiver: _Receiver) -> None:
    sid = _send(sink, "+15551230001", receiver.url)
    received = receiver.wait(2)
    validator = RequestValidator(TOKEN)
    assert [form["MessageStatus"] for _, form, _ in received] == ["sent", "delivered"]
    for url, form, signature in received:
        assert url == receiver.url
        assert validator.validate(url, form, signature), form
        assert not RequestValidator("another-token").validate(url, form, signature)
        assert form["MessageSid"] == sid and form["SmsSid"] == sid and form["AccountSid"] == SID
        assert form["To"] == "+15551230001" and form["From"] == "+15005550006"
        assert "ErrorCode" not in form
    fetched = Client(SID, TOKEN)
    fetched.api.base_url = sink.url
    assert fetched.messages(sid).fetch().status == "delivered"


def test_the_outcome_switch_makes_one_number_undelivered_until_cleared(
    sink: SmsSink, receiver: _Receiver
) -> None:
    request = urllib.request.Request(
        f"{sink.url}/_sink/outcomes",
        data=json.dumps({"to": "+15551230002", "status": "undelivered"}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 201
        assert json.load(answer)["outcome"] == {
            "status": "undelivered",
            "error_code": 30006,
            "to": "+15551230002",
        }
    _send(sink, "+15551230002", receiver.url)
    received = receiver.wait(2)
    assert [(f["MessageStatus"], f.get("ErrorCode")) for _, f, _ in received] == [
        ("sent", None),
        ("undelivered", "30006"),
    ]
    _send(sink, "+15551230003", receiver.url)  # another number: delivered
    assert receiver.wait(4)[-1][1]["MessageStatus"] == "delivered"

    sink.set_outcome("failed", error_code=30007)  # every number: failed, without a `sent` first
    _send(sink, "+15551230004", receiver.url)
    assert [(f["MessageStatus"], f["ErrorCode"]) for _, f, _ in receiver.wait(5)[4:]] == [("failed", "30007")]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"status": "lost"}, "status must be one of"),
        ({"status": "delivered", "error_code": 30006}, "no error_code"),
        ({"status": "undelivered", "to": "5551234"}, "E.164"),
        ({"status": "failed", "colour": "red"}, "unknown outcome field"),
    ],
)
def test_a_bad_outcome_is_a_400_saying_why(sink: SmsSink, body: dict[str, Any], reason: str) -> None:
    request = urllib.request.Request(
        f"{sink.url}/_sink/outcomes", data=json.dumps(body).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400 and reason in json.load(err.value)["error"]


def test_without_the_switch_no_callback_is_posted(receiver: _Receiver) -> None:
    with SmsSink(account_sid=SID, auth_token=TOKEN) as quiet:
        _send(quiet, "+15551230005", receiver.url)
        assert quiet.wait_for(1)
        time.sleep(0.3)  # ten times the callback delay the other tests use
    assert receiver.received == [] and quiet.callbacks() == []
