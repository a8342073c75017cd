"""The deploy bundle (infra/bundle.py, `make bundle`), installed as Cloud Functions would install it:
unzipped on its own, its requirements.txt installed into a clean virtual environment from the
package index, then every entry point loaded through functions-framework from the unzipped
main.py, with nothing of this repository on the path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.infra.hcl import ROOT, entry_points

pytestmark = pytest.mark.xdist_group("bundle")

BUNDLE_PY = ROOT / "infra" / "bundle.py"

# Runs inside the clean environment, from the unzipped bundle.
LOADER = r"""
import importlib, json, pathlib, sys
import functions_framework

targets = json.loads(sys.argv[1])
out = {"answers": {}}
for target, signature in targets.items():
    app = functions_framework.create_app(target, "main.py", signature)
    if signature == "http":
        # Not JSON: every handler refuses it (or needs configuration it lacks) with its own answer.
        r = app.test_client().post("/", data="x", content_type="text/plain")
        out["answers"][target] = [r.status_code, r.get_json(silent=True)]
    else:
        out["answers"][target] = [None, sorted(rule.rule for rule in app.url_map.iter_rules())]
modules = []
for path in sorted(pathlib.Path("shared").rglob("*.py")):
    name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    importlib.import_module(name)
    modules.append(name)
import shared
out["shared"] = str(pathlib.Path(shared.__file__).resolve())
out["modules"] = modules
out["prefix"] = sys.prefix
print("LOADER-RESULT " + json.dumps(out))
"""


def build(output: Path) -> Path:
    subprocess.run([sys.executable, str(BUNDLE_PY), "--output", str(output)], cwd=ROOT, check=True)
    return output


def test_makefile_bundle_target_runs_the_bundle_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^bundle:.*\n((?:\t.*\n?)+)", makefile, re.MULTILINE)
    assert rule, "make bundle is missing"
    assert "infra/bundle.py --output dist/function-source.zip" in rule.group(1)


def test_bundle_is_deterministic_and_holds_only_what_ships(tmp_path: Path) -> None:
    first = build(tmp_path / "a.zip")
    second = build(tmp_path / "b.zip")
    assert first.read_bytes() == second.read_bytes(), "same sources must give the same bundle"

    with zipfile.ZipFile(first) as zf:
        names = set(zf.namelist())
        assert zf.read("main.py") == (ROOT / "functions" / "main.py").read_bytes()
        requirements = zf.read("requirements.txt").decode()
        shipped = {n: zf.read(n) for n in names if n.startswith("shared/")}
    assert {"main.py", "requirements.txt", "shared/__init__.py"} <= names
    assert not [n for n in names if n.startswith("shared/dev/") or "__pycache__" in n or n.endswith(".pyc")]
    expected = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "shared").rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not p.name.endswith(".pyc")
        and not p.relative_to(ROOT).as_posix().startswith("shared/dev/")
    }
    assert set(shipped) == expected
    for name, data in shipped.items():
        assert data == (ROOT / name).read_bytes(), name

    # Every runtime dependency of pyproject.toml is pinned, to a version it accepts.
    pins = {}
    for line in requirements.splitlines():
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
        pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for raw in declared:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the bundle's requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} vs {req}"
    # Nothing only the tests or the local stack use.
    for dev_only in ("pytest", "pgserver", "checkov", "ruff", "mypy", "hypothesis"):
        assert dev_only not in pins, f"{dev_only} must not ship"


def test_bundle_installs_and_every_entry_point_loads(tmp_path: Path) -> None:
    bundle = build(tmp_path / "function-source.zip")
    src = tmp_path / "src"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(src)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--quiet", "--no-compile", "-r", str(src / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, f"inconsistent requirements: {check.stdout}{check.stderr}"

    targets = entry_points()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    proc = subprocess.run(
        [str(python), "-c", LOADER, json.dumps(targets)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOADER-RESULT "))
    result = json.loads(line.removeprefix("LOADER-RESULT "))

    assert Path(result["prefix"]).resolve() == venv.resolve()
    assert Path(result["shared"]).is_relative_to(src.resolve()), "shared must come from the bundle"
    assert set(result["answers"]) == set(targets)
    for target, (status, body) in result["answers"].items():
        if targets[target] == "http":
            # The handler in shared/web.py answered (its JSON error), not a crash page.
            assert isinstance(body, dict) and "error" in body, f"{target}: {status} {body}"
            assert 400 <= status < 600
        else:
            assert "/" in body, f"{target}: no route"
    assert "shared.store.postgres" in result["modules"] and "shared.tasks" in result["modules"]
