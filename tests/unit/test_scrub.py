"""Personal data kept out of logs and stored error text (shared.log.scrub), and settings that must
never reach a deployment."""

from __future__ import annotations

import pytest

from shared.config import Settings
from shared.log import scrub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The 'To' number +15551234567 is not valid.", "The 'To' number [phone] is not valid."),
        ('duplicate key value violates unique constraint "users_phone_number_key"\n'
         "DETAIL:  Key (phone_number)=(+15550001111) already exists.",
         'duplicate key value violates unique constraint "users_phone_number_key"'),
        ("error\nCONTEXT:  PL/pgSQL function mq_enqueue line 3", "error"),
        ("call (555) 123-4567, 555.123.4567 or 555-123-4567", "call [phone], [phone] or [phone]"),
        # what is not a phone number stays
        ("21211 at 2025-06-02 15:00:00, id 3fa85f64-5717-4562-b3fc-2c963f66afa6, n=1234567",
         "21211 at 2025-06-02 15:00:00, id 3fa85f64-5717-4562-b3fc-2c963f66afa6, n=1234567"),
        (None, None),
    ],
)  # fmt: skip
def test_scrub(text: str | None, expected: str | None) -> None:
    assert scrub(text) == expected


def test_the_loopback_signature_bypass_refuses_to_start_on_cloud_run() -> None:
    assert Settings.from_env({"TWILIO_SIGNATURE_BYPASS": "local-only"}).twilio_signature_bypass_local
    with pytest.raises(ValueError, match="K_SERVICE"):
        Settings.from_env({"TWILIO_SIGNATURE_BYPASS": "local-only", "K_SERVICE": "twilio-inbound"})
    assert not Settings.from_env({"K_SERVICE": "twilio-inbound"}).twilio_signature_bypass_local


@pytest.mark.parametrize(
    ("url", "printed"),
    [
        (
            "postgresql://postgres:@/orchestrator?host=/tmp/pg",
            "postgresql://postgres@/orchestrator?host=/tmp/pg",
        ),
        ("postgresql://app:s3cret@db.example:5432/d", "postgresql://app@db.example:5432/d"),
        ("postgresql:///o?host=/tmp/pg", "postgresql:///o?host=/tmp/pg"),
    ],
)
def test_make_dev_prints_a_database_url_without_its_password_that_psql_takes(url: str, printed: str) -> None:
    from shared.dev.stack import LocalStack

    assert LocalStack._redacted(url) == printed
