"""bench/coldstart.py's helpers (no timings here: the bench itself is `make bench`)."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator

from bench import coldstart


def test_signed_webhooks_carry_the_signature_twilio_would_send_for_that_url_and_form() -> None:
    url = "http://127.0.0.1:8087/"
    form = {"From": "+15557000001", "Body": "hi & bye", "MessageSid": "SM" + "1" * 32}
    body, headers = coldstart.signed(url, form)
    assert dict(parse_qsl(body.decode())) == form
    validator = RequestValidator(coldstart.AUTH_TOKEN)
    assert validator.validate(url, form, headers["X-Twilio-Signature"])
    assert not validator.validate("http://127.0.0.1:8088/", form, headers["X-Twilio-Signature"])


def test_the_functions_run_as_deployed_signatures_checked_and_bytecode_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_SIGNATURE_BYPASS", "local-only")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = coldstart.function_env(
        "postgresql://db", "127.0.0.1:1", "http://sink", "http://deliver/", "/tmp/pyc"
    )
    assert "TWILIO_SIGNATURE_BYPASS" not in env and "PYTHONDONTWRITEBYTECODE" not in env
    assert env["DATABASE_URL"] == "postgresql://db" and env["CLOUD_TASKS_EMULATOR_HOST"] == "127.0.0.1:1"
    assert env["PYTHONPYCACHEPREFIX"] == "/tmp/pyc"


def test_rss_is_read_from_proc_in_megabytes() -> None:
    assert 5 < coldstart.rss_mb(os.getpid()) < 2000
