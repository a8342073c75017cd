"""Fixtures for the SMS path: a local Twilio-compatible sink and the real twilio client pointed at it.

Import them into a conftest.py (`from tests.integration.sms_fixtures import sms_sink, ...`) or a test
module. Each test gets its own sink on an ephemeral port, so a slow-answer fault from one test can
never record a message into the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.dev.sink import SmsSink
from shared.sms import TwilioSender, build_twilio_client

TEST_ACCOUNT_SID = "AC" + "0" * 32
TEST_AUTH_TOKEN = "test-auth-token"
TEST_FROM_NUMBER = "+15005550006"  # Twilio's magic "valid From" number
TEST_MESSAGING_SERVICE_SID = "MG" + "1" * 32
TEST_STATUS_CALLBACK = "https://example.test/twilio/status"
# Short, so timeout tests stay fast; the sink answers in milliseconds otherwise.
TEST_TIMEOUT_SECONDS = 1


@pytest.fixture
def sms_sink() -> Iterator[SmsSink]:
    """A running SMS sink that requires TEST_ACCOUNT_SID / TEST_AUTH_TOKEN as basic auth."""
    with SmsSink(account_sid=TEST_ACCOUNT_SID, auth_token=TEST_AUTH_TOKEN) as sink:
        yield sink


@pytest.fixture
def twilio_client(sms_sink: SmsSink) -> Any:
    """The real twilio Client, talking to `sms_sink` with a 1 s request timeout."""
    return build_twilio_client(
        TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=sms_sink.url, timeout_seconds=TEST_TIMEOUT_SECONDS
    )


@pytest.fixture
def twilio_sender(twilio_client: Any) -> TwilioSender:
    """The SmsSender adapter, sending from TEST_FROM_NUMBER with TEST_STATUS_CALLBACK."""
    return TwilioSender(twilio_client, from_number=TEST_FROM_NUMBER, status_callback=TEST_STATUS_CALLBACK)
