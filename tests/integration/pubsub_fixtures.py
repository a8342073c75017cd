"""Session fixture for Google's Pub/Sub emulator (`gcloud beta emulators pubsub start`, a real Java
process under gcloud).

Import it into a conftest.py (`from tests.integration.pubsub_fixtures import pubsub_emulator`) or a
test module. Each pytest-xdist worker that uses it gets its own emulator (about 2.5 s to start) on a
port of its own; mark the modules `pytest.mark.xdist_group("pubsub")` so that, with
`--dist loadgroup`, they share one worker and one start-up.

When gcloud, its pubsub-emulator component or Java is missing, the fixture fails the test if the CI
environment variable is set (a CI machine must have them) and skips it with the reason otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.dev.pubsub_emulator import PubSubEmulator, missing_reason

__all__ = ["PUBSUB_TEST_PROJECT", "pubsub_emulator"]

PUBSUB_TEST_PROJECT = "test-project"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """A running emulator for PUBSUB_TEST_PROJECT; `.host` is its PUBSUB_EMULATOR_HOST.

    Topics and subscriptions live for the whole session: give each test names of its own.
    """
    reason = missing_reason()
    if reason is not None:
        reason = f"Pub/Sub emulator unavailable: {reason}"
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    with PubSubEmulator(project=PUBSUB_TEST_PROJECT) as emulator:
        yield emulator
