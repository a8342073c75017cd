"""The Twilio adapter and the local SMS sink, through the real twilio client over real HTTP. No mocks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from twilio.base.exceptions import TwilioRestException

from shared import sms
from shared.dev.sink import SmsSink
from shared.errors import PermanentSendError, TransientSendError
from shared.sms import TwilioSender, build_twilio_client
from tests.integration.sms_fixtures import (
    TEST_ACCOUNT_SID,
    TEST_AUTH_TOKEN,
    TEST_FROM_NUMBER,
    TEST_MESSAGING_SERVICE_SID,
    TEST_STATUS_CALLBACK,
)

TO = "+15551230001"
OTHER = "+15551230002"
SID = re.compile(r"^SM[0-9a-f]{32}$")


def test_send_returns_the_sid_the_sink_recorded(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    message_id = uuid.uuid4()

    sid = twilio_sender.send(TO, "Your table is ready", message_id=message_id)

    assert SID.match(sid)
    [recorded] = sms_sink.messages()
    assert recorded["sid"] == sid
    assert recorded["to"] == TO
    assert recorded["from"] == TEST_FROM_NUMBER
    assert recorded["messaging_service_sid"] is None
    assert recorded["body"] == "Your table is ready"
    assert recorded["account_sid"] == TEST_ACCOUNT_SID
    assert datetime.fromisoformat(recorded["received_at"]).tzinfo is not None


def test_status_callback_carries_the_message_id(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    message_id = uuid.uuid4()
    twilio_sender.send(TO, "hello", message_id=message_id)

    callback = urlsplit(sms_sink.messages()[0]["status_callback"])
    assert callback._replace(query="").geturl() == TEST_STATUS_CALLBACK
    assert parse_qs(callback.query) == {"message_id": [str(message_id)]}


def test_status_callback_url_keeps_existing_query_and_replaces_a_stale_id() -> None:
    message_id = uuid.uuid4()
    url = sms.status_callback_url("https://h.test/s?env=dev&message_id=old", message_id)
    assert parse_qs(urlsplit(url).query) == {"env": ["dev"], "message_id": [str(message_id)]}


def test_messaging_service_sid_is_sent_instead_of_from(sms_sink: SmsSink, twilio_client: Any) -> None:
    sender = TwilioSender(twilio_client, messaging_service_sid=TEST_MESSAGING_SERVICE_SID)

    sid = sender.send(TO, "via the service", message_id=uuid.uuid4())

    [recorded] = sms_sink.messages()
    assert recorded["sid"] == sid
    assert recorded["messaging_service_sid"] == TEST_MESSAGING_SERVICE_SID
    assert recorded["from"] is None
    assert recorded["status_callback"] is None


@pytest.mark.parametrize(
    ("from_number", "service"),
    [(None, None), (TEST_FROM_NUMBER, TEST_MESSAGING_SERVICE_SID), ("", "")],
)
def test_exactly_one_sender_identity_is_required(
    twilio_client: Any, from_number: str | None, service: str | None
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TwilioSender(twilio_client, from_number=from_number, messaging_service_sid=service)


@pytest.mark.parametrize(
    ("to", "code"),
    [
        ("+15005550001", "21211"),
        ("+15005550002", "21612"),
        ("+15005550003", "21408"),
        ("+15005550004", "21610"),
        ("+15005550009", "21614"),
        ("5551234", "21211"),  # not E.164
    ],
)
def test_refused_numbers_are_permanent(
    sms_sink: SmsSink, twilio_sender: TwilioSender, to: str, code: str
) -> None:
    with pytest.raises(PermanentSendError) as caught:
        twilio_sender.send(to, "hi", message_id=uuid.uuid4())

    assert caught.value.provider_code == code
    assert caught.value.provider_status == 400
    assert caught.value.to_dict()["provider_code"] == code
    assert sms_sink.messages() == []


def test_other_400_with_a_twilio_code_is_permanent(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    # An empty body is refused by Twilio with 21602, a code outside the known list.
    with pytest.raises(PermanentSendError) as caught:
        twilio_sender.send(TO, "", message_id=uuid.uuid4())
    assert (caught.value.provider_code, caught.value.provider_status) == ("21602", 400)


def test_body_over_1600_characters_is_permanent(twilio_sender: TwilioSender) -> None:
    with pytest.raises(PermanentSendError) as caught:
        twilio_sender.send(TO, "x" * 1601, message_id=uuid.uuid4())
    assert caught.value.provider_code == "21617"


@pytest.mark.parametrize(
    ("status", "code", "expected_code"),
    [
        (500, None, "20500"),
        (502, 12345, "12345"),
        (503, None, "20503"),
        (429, 20429, "20429"),
        (429, None, "20429"),
        (400, 20429, "20429"),  # the rate-limit code wins over the status
        (401, 20003, "20003"),  # bad credentials: config, not this message's fault
        (403, 20003, "20003"),
    ],
)
def test_server_errors_rate_limits_and_auth_failures_are_transient(
    sms_sink: SmsSink,
    twilio_sender: TwilioSender,
    status: int,
    code: int | None,
    expected_code: str,
) -> None:
    sms_sink.add_fault(status=status, code=code, count=1)

    with pytest.raises(TransientSendError) as caught:
        twilio_sender.send(TO, "hi", message_id=uuid.uuid4())

    assert (caught.value.provider_code, caught.value.provider_status) == (expected_code, status)
    # A 5xx may come after Twilio created the message (Twilio's edge, or its 500 on create): unknown.
    # A 4xx is a refusal before any message exists: the claim can be given back.
    assert caught.value.maybe_sent is (status >= 500)
    assert sms_sink.messages() == []
    # The fault was for one send only: the retry goes through.
    assert SID.match(twilio_sender.send(TO, "hi", message_id=uuid.uuid4()))
    assert len(sms_sink.messages()) == 1


def test_404_with_a_code_is_permanent(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    sms_sink.add_fault(status=404, code=20404)
    with pytest.raises(PermanentSendError) as caught:
        twilio_sender.send(TO, "hi", message_id=uuid.uuid4())
    assert (caught.value.provider_code, caught.value.provider_status) == ("20404", 404)


def test_faults_count_down_and_can_target_one_number(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    sms_sink.add_fault(status=500, count=2, to=OTHER)

    twilio_sender.send(TO, "unaffected", message_id=uuid.uuid4())
    for _ in range(2):
        with pytest.raises(TransientSendError):
            twilio_sender.send(OTHER, "fails", message_id=uuid.uuid4())
    twilio_sender.send(OTHER, "recovered", message_id=uuid.uuid4())

    assert [m["body"] for m in sms_sink.messages()] == ["unaffected", "recovered"]


def test_slow_answer_is_a_transient_timeout_with_unknown_outcome(
    sms_sink: SmsSink, twilio_sender: TwilioSender
) -> None:
    # Delay only: the sink accepts the message after the client (1 s timeout) has given up.
    sms_sink.add_fault(delay_seconds=1.2)

    with pytest.raises(TransientSendError) as caught:
        twilio_sender.send(TO, "late", message_id=uuid.uuid4())

    assert sms_sink.messages() == []  # not yet: the client gave up first
    assert caught.value.provider_code == sms.TIMEOUT
    assert caught.value.provider_code in sms.OUTCOME_UNKNOWN_CODES
    # Which is why a timeout must be reconciled, not blindly resent: the provider did send it.
    [late] = sms_sink.wait_for(1, to=TO, timeout=3)
    assert late["body"] == "late"


def test_slow_error_answer_is_a_timeout_too(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    sms_sink.add_fault(status=500, delay_seconds=1.3)
    with pytest.raises(TransientSendError) as caught:
        twilio_sender.send(TO, "late", message_id=uuid.uuid4())
    assert caught.value.provider_code == sms.TIMEOUT


def test_unreachable_server_is_a_transient_connection_error() -> None:
    with SmsSink() as sink:
        url = sink.url
    client = build_twilio_client(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=url, timeout_seconds=1)
    sender = TwilioSender(client, from_number=TEST_FROM_NUMBER)

    with pytest.raises(TransientSendError) as caught:
        sender.send(TO, "hi", message_id=uuid.uuid4())
    # Refused before a byte of the request went out: certainly not sent.
    assert caught.value.provider_code == sms.CONNECT_FAILED
    assert not caught.value.maybe_sent


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_an_error_after_twilio_created_the_message_says_it_may_be_sent(
    sms_sink: SmsSink, twilio_sender: TwilioSender, status: int
) -> None:
    sms_sink.add_fault(status=status, accept=True)

    with pytest.raises(TransientSendError) as caught:
        twilio_sender.send(TO, "created anyway", message_id=uuid.uuid4())

    assert caught.value.maybe_sent and caught.value.provider_status == status
    # Twilio has it, so sending again would send it twice: it must be reconciled instead.
    assert [m["body"] for m in sms_sink.messages()] == ["created anyway"]
    assert [r.sid for r in twilio_sender.find_sent(TO, "created anyway", since=datetime.now(UTC))] == [
        sms_sink.messages()[0]["sid"]
    ]


def test_a_connection_dropped_after_the_request_is_an_unknown_outcome(
    sms_sink: SmsSink, twilio_sender: TwilioSender
) -> None:
    sms_sink.add_fault(drop=True, accept=True)

    with pytest.raises(TransientSendError) as caught:
        twilio_sender.send(TO, "no answer", message_id=uuid.uuid4())

    assert caught.value.provider_code == sms.CONNECTION_ERROR and caught.value.maybe_sent
    assert [m["body"] for m in sms_sink.messages()] == ["no answer"]


def test_sink_fault_options_are_checked() -> None:
    with SmsSink() as sink:
        for bad in ({"drop": True, "status": 502}, {"accept": True}, {"accept": "yes", "status": 502}):
            assert requests.post(f"{sink.url}/_sink/faults", json=bad, timeout=5).status_code == 400


def test_find_sent_matches_a_body_twilio_smart_encoded() -> None:
    with SmsSink(account_sid=TEST_ACCOUNT_SID, auth_token=TEST_AUTH_TOKEN, smart_encoding=True) as sink:
        client = build_twilio_client(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=sink.url, timeout_seconds=1)
        sender = TwilioSender(client, messaging_service_sid=TEST_MESSAGING_SERVICE_SID)
        since = datetime.now(UTC)
        ours = "It\u2019s \u201cready\u201d \u2013 table 4\u2026"
        sid = sender.send(TO, ours, message_id=uuid.uuid4())
        other = sender.send(TO, "It\u2019s \u201cready\u201d \u2013 table 5\u2026", message_id=uuid.uuid4())

        # Twilio keeps the rewritten text, not ours...
        assert sink.messages()[0]["body"] == 'It\'s "ready" - table 4...'
        # ...and reconciliation still knows it, and only it.
        assert [r.sid for r in sender.find_sent(TO, ours, since=since)] == [sid]
        assert other not in [r.sid for r in sender.find_sent(TO, ours, since=since)]
        assert sender.find_sent(TO, "It's ready - table 4...", since=since) == []


def test_missing_auth_is_answered_401_like_twilio(sms_sink: SmsSink) -> None:
    url = f"{sms_sink.url}/2010-04-01/Accounts/{TEST_ACCOUNT_SID}/Messages.json"

    response = requests.post(url, data={"To": TO, "From": TEST_FROM_NUMBER, "Body": "hi"}, timeout=5)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    assert sms_sink.messages() == []


def test_wrong_credentials_are_refused_through_the_real_client(sms_sink: SmsSink) -> None:
    client = build_twilio_client(TEST_ACCOUNT_SID, "wrong-token", base_url=sms_sink.url, timeout_seconds=1)

    with pytest.raises(TwilioRestException) as caught:
        client.messages.create(to=TO, from_=TEST_FROM_NUMBER, body="hi")

    assert (caught.value.status, caught.value.code) == (401, 20003)
    assert sms_sink.messages() == []


def test_any_basic_auth_is_accepted_when_the_sink_has_no_credentials() -> None:
    with SmsSink() as open_sink:
        client = build_twilio_client("ACanything", "anything", base_url=open_sink.url, timeout_seconds=1)
        sid = TwilioSender(client, from_number=TEST_FROM_NUMBER).send(TO, "hi", message_id=uuid.uuid4())
        assert [m["sid"] for m in open_sink.messages()] == [sid]


def test_create_answer_parses_into_a_message_instance(sms_sink: SmsSink, twilio_client: Any) -> None:
    message = twilio_client.messages.create(
        to=TO, from_=TEST_FROM_NUMBER, body="hi", status_callback=TEST_STATUS_CALLBACK
    )

    assert SID.match(message.sid)
    assert (message.to, message.from_, message.body, message.status) == (TO, TEST_FROM_NUMBER, "hi", "queued")
    assert message.account_sid == TEST_ACCOUNT_SID
    assert message.date_created is not None and message.date_created.tzinfo is not None
    assert message.date_sent is None
    assert twilio_client.messages(message.sid).fetch().status == "sent"


def test_listing_filters_by_recipient_and_date_sent(
    sms_sink: SmsSink, twilio_client: Any, twilio_sender: TwilioSender
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    sids = [twilio_sender.send(TO, f"n{i}", message_id=uuid.uuid4()) for i in range(3)]
    twilio_sender.send(OTHER, "someone else", message_id=uuid.uuid4())

    listed = twilio_client.messages.list(to=TO, date_sent_after=before)

    assert {m.sid for m in listed} == set(sids)
    assert all(
        m.to == TO and m.status == "sent" and m.date_sent >= before.replace(microsecond=0) for m in listed
    )
    assert twilio_client.messages.list(to=TO, date_sent_after=datetime.now(UTC) + timedelta(seconds=2)) == []
    assert len(twilio_client.messages.list(to=TO, date_sent_before=before - timedelta(days=1))) == 0
    assert [m.body for m in twilio_client.messages.list(to=OTHER)] == ["someone else"]


def test_listing_pages_through_next_page_uri(twilio_client: Any, twilio_sender: TwilioSender) -> None:
    sids = [twilio_sender.send(TO, f"n{i}", message_id=uuid.uuid4()) for i in range(5)]

    page = twilio_client.messages.page(to=TO, page_size=2)
    assert len(list(page)) == 2
    assert page.next_page_url is not None
    # list() follows next_page_uri to the end, newest first.
    assert [m.sid for m in twilio_client.messages.list(to=TO, page_size=2)] == sids[::-1]
    assert len(twilio_client.messages.list(to=TO, limit=3)) == 3


def test_control_api_over_http(sms_sink: SmsSink, twilio_sender: TwilioSender) -> None:
    base = sms_sink.url
    assert requests.get(f"{base}/_sink/health", timeout=5).status_code == 200

    bad = requests.post(f"{base}/_sink/faults", json={"count": 1}, timeout=5)
    assert bad.status_code == 400
    created = requests.post(f"{base}/_sink/faults", json={"status": 503, "count": 1, "to": TO}, timeout=5)
    assert created.status_code == 201
    with pytest.raises(TransientSendError):
        twilio_sender.send(TO, "hi", message_id=uuid.uuid4())

    requests.post(f"{base}/_sink/faults", json={"status": 500, "count": 5}, timeout=5)
    assert requests.delete(f"{base}/_sink/faults", timeout=5).status_code == 200
    twilio_sender.send(TO, "to me", message_id=uuid.uuid4())
    twilio_sender.send(OTHER, "to other", message_id=uuid.uuid4())

    everything = requests.get(f"{base}/_sink/messages", timeout=5).json()["messages"]
    mine = requests.get(f"{base}/_sink/messages", params={"to": TO}, timeout=5).json()["messages"]
    assert [m["body"] for m in everything] == ["to me", "to other"]
    assert [m["body"] for m in mine] == ["to me"]

    assert requests.delete(f"{base}/_sink/messages", timeout=5).status_code == 200
    assert sms_sink.messages() == []


def test_record_file_gets_one_json_line_per_message(tmp_path: Path) -> None:
    record = tmp_path / "sent.jsonl"
    with SmsSink(record_path=record) as sink:
        client = build_twilio_client(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=sink.url, timeout_seconds=1)
        sender = TwilioSender(client, from_number=TEST_FROM_NUMBER)
        sids = [sender.send(TO, body, message_id=uuid.uuid4()) for body in ("a", "b")]
        with pytest.raises(PermanentSendError):
            sender.send("+15005550001", "refused", message_id=uuid.uuid4())

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(line["sid"], line["body"]) for line in lines] == list(zip(sids, ["a", "b"], strict=True))


def test_cli_serves_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    record = tmp_path / "cli.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.dev.sink", "--port", "0", "--record", str(record)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "listening"
        client = build_twilio_client(
            TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=started["url"], timeout_seconds=5
        )
        sid = TwilioSender(client, from_number=TEST_FROM_NUMBER).send(TO, "cli", message_id=uuid.uuid4())
        logged = json.loads(proc.stdout.readline())
        assert (logged["event"], logged["sid"], logged["to"], logged["body"]) == ("message", sid, TO, "cli")
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(record.read_text())["sid"] == sid


def test_unreadable_success_answer_is_transient_with_unknown_outcome() -> None:
    error = sms.classify(json.JSONDecodeError("Expecting value", "<html>", 0))
    assert isinstance(error, TransientSendError)
    assert error.provider_code in sms.OUTCOME_UNKNOWN_CODES


def test_find_sent_lists_every_matching_message_newest_first(
    twilio_sender: TwilioSender, sms_sink: SmsSink
) -> None:
    to = "+15557654321"
    since = datetime.now(UTC) - timedelta(seconds=5)
    first = twilio_sender.send(to, "Reminder: today", message_id=uuid.uuid4())
    twilio_sender.send(to, "something else", message_id=uuid.uuid4())
    second = twilio_sender.send(to, "Reminder: today", message_id=uuid.uuid4())
    twilio_sender.send("+15550000000", "Reminder: today", message_id=uuid.uuid4())
    found = twilio_sender.find_sent(to, "Reminder: today", since=since)
    assert [r.sid for r in found] == [second, first]
    assert all(r.sent_at.tzinfo is not None for r in found)
    # Accepted long before the claim (beyond the clock-skew allowance): not this claim's send.
    assert twilio_sender.find_sent(to, "Reminder: today", since=datetime.now(UTC) + timedelta(hours=1)) == []


def test_find_sent_when_twilio_cannot_be_asked_is_transient() -> None:
    client = build_twilio_client("AC" + "0" * 32, "token", base_url="http://127.0.0.1:1", timeout_seconds=1)
    sender = TwilioSender(client, from_number="+15005550006")
    with pytest.raises(TransientSendError):
        sender.find_sent("+15557654321", "x", since=datetime.now(UTC))


def test_an_accepted_send_answered_late_exists_while_its_sender_waits(
    sms_sink: SmsSink, twilio_sender: TwilioSender
) -> None:
    """accept with only a delay (the chaos test's fault): created at once, answered normally later.
    The delay stays well under the fixture client's 1 s read timeout, or the send would time out."""
    import threading

    sms_sink.add_fault(accept=True, delay_seconds=0.5)
    results: list[str] = []
    sender = threading.Thread(
        target=lambda: results.append(twilio_sender.send(TO, "held", message_id=uuid.uuid4()))
    )
    sender.start()
    [recorded] = sms_sink.wait_for(1, timeout=0.4)
    assert sender.is_alive(), "answered before the delay"
    sender.join(timeout=5)
    assert recorded["body"] == "held" and results == [recorded["sid"]]
