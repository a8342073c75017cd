"""What a cold instance does not import before it needs it (issue 17: cold starts). Each check runs
in a fresh interpreter, since this one has long imported everything."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.bootstrap import ConfigurationError, Container, LazyTaskQueue
from shared.config import Settings

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
from shared.bootstrap import Container
from shared.config import Settings
before = set(sys.modules)
import functions.main
after_import = set(sys.modules)
container = Container(Settings(deliver_url="http://127.0.0.1:9/"))
container.tasks
print(json.dumps({"import": sorted(after_import - before), "tasks": sorted(set(sys.modules) - after_import)}))
"""


def _probe() -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_neither_importing_the_functions_nor_asking_for_the_task_queue_imports_the_cloud_tasks_client() -> (
    None
):
    loaded = _probe()
    heavy = (
        "google.cloud.tasks_v2",
        "grpc",
        "twilio",
        "psycopg_pool",
        "anthropic",
        "shared.tasks",
        "shared.sms",
    )
    for phase, modules in loaded.items():
        assert not [m for m in modules if m.startswith(heavy)], phase
    assert "shared.web" in loaded["import"]  # the probe did import the functions


class _Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[uuid.UUID, int]] = []

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        self.calls.append((message_id, generation))
        return f"tasks/{message_id}-{generation}"


def test_the_lazy_task_queue_builds_the_real_one_once_on_the_first_task_and_hands_it_every_task() -> None:
    built: list[_Recording] = []

    def build(settings: Settings) -> _Recording:
        built.append(_Recording())
        return built[-1]

    queue = LazyTaskQueue(Settings(deliver_url="http://127.0.0.1:9/"), build)
    assert built == []
    now = datetime(2026, 1, 5, 12, tzinfo=UTC)
    first, second = uuid.uuid4(), uuid.uuid4()
    assert queue.schedule(first, 0, now + timedelta(minutes=1), now) == f"tasks/{first}-0"
    assert queue.schedule(second, 3, now, now) == f"tasks/{second}-3"
    assert len(built) == 1 and built[0].calls == [(first, 0), (second, 3)]


def test_a_function_without_deliver_url_is_still_misconfigured_as_soon_as_it_asks_for_the_task_queue() -> (
    None
):
    with pytest.raises(ConfigurationError, match="DELIVER_URL"):
        _ = Container(Settings()).tasks


_TASKS_PROBE = """
import json, sys
import shared.tasks
loaded = "aiohttp" in sys.modules
import google.auth.aio.transport.sessions
print(json.dumps({"aiohttp_with_the_client": loaded, "aiohttp_after": "aiohttp" in sys.modules}))
"""


def test_the_cloud_tasks_client_loads_without_aiohttp_which_still_imports_afterwards() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _TASKS_PROBE], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"aiohttp_with_the_client": False, "aiohttp_after": True}


_RENDER_PROBE = """
import json, sys
from shared.bootstrap import build_renderer
from shared.config import Settings
template = type(build_renderer(Settings())).__name__
without_key = "anthropic" in sys.modules
claude = type(build_renderer(Settings(anthropic_api_key="sk-test"))).__name__
print(json.dumps([template, without_key, claude, "anthropic" in sys.modules]))
"""


def test_the_template_renderer_is_built_without_importing_the_anthropic_sdk_and_claude_still_is() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _RENDER_PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        "TemplateRenderer",
        False,
        "ClaudeRenderer",
        True,
    ]


_SERVICE_PROBE = """
import json, sys
import functions.main
from shared import service
loaded = sorted(m for m in sys.modules if m.startswith("shared.service."))
import shared.service.deliver  # loads reconcile too, before anyone asked for service.reconcile
names = ("deliver", "reconcile", "sweep", "schedule")
kinds = {name: type(getattr(service, name)).__name__ for name in names}
print(json.dumps({"loaded": loaded, "kinds": kinds, "all": sorted(service.__all__)}))
"""


def test_importing_the_functions_loads_no_use_case_and_each_name_is_the_use_case_not_its_module() -> None:
    import shared.service as service

    done = subprocess.run(
        [sys.executable, "-c", _SERVICE_PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []  # a cold schedule_message pays for schedule.py on its first request only
    assert found["kinds"] == dict.fromkeys(("deliver", "reconcile", "sweep", "schedule"), "function")
    assert found["all"] == sorted(service._HOME)
    with pytest.raises(AttributeError, match="no_such_use_case"):
        _ = service.no_such_use_case  # type: ignore[attr-defined]
