"""Session fixtures for the Cloud Tasks emulator (a real `gcloud-tasks-emulator` process).

Import them into a conftest.py (`from tests.integration.tasks_fixtures import tasks_emulator,
tasks_client`). Each pytest-xdist worker gets its own emulator (about half a second to start) on a
port of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from google.cloud import tasks_v2

from shared.dev.tasks_emulator import PYTHON_ENV, TasksEmulator, default_python
from shared.tasks import build_tasks_client

__all__ = ["TASKS_QUEUE_PATH", "tasks_client", "tasks_emulator"]

TASKS_QUEUE_PATH = "projects/test-project/locations/us-central1/queues/deliver"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="session")
def tasks_emulator() -> Iterator[TasksEmulator]:
    """A running emulator whose queue TASKS_QUEUE_PATH exists; `.host` for build_tasks_client."""
    python = default_python()
    if not python.exists():
        reason = (
            f"Cloud Tasks emulator venv missing: {python} does not exist "
            f"(run `make install`, or set {PYTHON_ENV})"
        )
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    with TasksEmulator(TASKS_QUEUE_PATH, python=python) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def tasks_client(tasks_emulator: TasksEmulator) -> Iterator[tasks_v2.CloudTasksClient]:
    """The real google-cloud-tasks client, connected to the session's emulator."""
    with build_tasks_client(tasks_emulator.host) as client:
        yield client
