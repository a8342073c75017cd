"""What `make dev` and `make test` install: make dev the runtime and the `local` extra only (no test
toolchain), make test everything; and the `local` extra covers every third-party import of shared/dev."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pip_installs(target: str) -> list[str]:
    # -n -B: print every recipe the target would run, as on a clean clone, running none of them.
    out = subprocess.run(
        ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return re.findall(r"\.venv/bin/python -m pip install -q -e '(\.\[[^\]]*\])'", out)


def test_make_dev_installs_only_the_local_extra_and_make_test_everything() -> None:
    assert _pip_installs("dev") == [".[local]"]
    assert _pip_installs("test") == [".[local,dev]"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in {"shared", "__future__"}}


def test_the_local_extra_covers_what_shared_dev_imports_and_no_test_tool() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    local = {_name(r) for r in project["optional-dependencies"]["local"]}
    available = {_name(r) for r in project["dependencies"]} | local
    owners = packages_distributions()
    missing = {}
    for path in sorted((REPO / "shared" / "dev").glob("*.py")):
        for module in _third_party_imports(path):
            if module == "gcloud_tasks_emulator":
                continue  # runs in .venv-emulator, which make dev installs on its own
            # google and grpc come with google-cloud-pubsub/-tasks; a module not installed here is
            # taken to be its own distribution's name.
            dists = {_name(d) for d in owners.get(module, [module])}
            if not dists & available and module not in {"google", "grpc"}:
                missing[f"{path.name}: {module}"] = sorted(dists)
    assert missing == {}, "add these to the local extra (pyproject.toml)"
    assert not local & {"pytest", "checkov", "schemathesis", "pgqueuer", "mypy", "ruff", "hypothesis"}
