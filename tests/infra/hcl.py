"""Read infra/terraform with python-hcl2, whichever `hcl2` is installed.

Two distributions ship an `hcl2` package: python-hcl2 and bc-python-hcl2 (checkov's fork, the one
pyproject.toml installs; both at once would overwrite each other). They disagree on the shape of the result:
bc wraps every attribute value in a one-element list; python-hcl2 >= 7 keeps the quotes of string
literals and block labels and marks blocks with `__is_block__`. `Block` hides both, so the tests
see attributes as plain values, strings without their quotes, and expressions as "${...}".
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

import hcl2

ROOT = Path(__file__).resolve().parents[2]
TF_DIR = ROOT / "infra" / "terraform"
MAIN_PY = ROOT / "functions" / "main.py"

_META = frozenset({"__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__"})


@cache
def _flavor() -> tuple[bool, bool]:
    """(attribute values wrapped in a list, string literals keep their quotes)."""
    probe = hcl2.loads('a = "b"\n')["a"]
    wrapped = isinstance(probe, list)
    value = probe[0] if wrapped else probe
    return wrapped, value == '"b"'


def _unquote(value: str) -> str:
    if _flavor()[1] and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def clean(value: Any) -> Any:
    """An attribute value without the parser's quirks (quotes, meta keys)."""
    if isinstance(value, str):
        return _unquote(value)
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): clean(v) for k, v in value.items() if k not in _META}
    return value


def squash(expr: Any) -> str:
    """An expression with all whitespace removed, for comparisons across parsers."""
    return re.sub(r"\s+", "", str(expr))


class Block:
    """A block body: attributes by name (b["x"]), nested blocks by name (b.blocks("x"))."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = {_unquote(k): v for k, v in raw.items() if k not in _META}

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def __getitem__(self, key: str) -> Any:
        value = self.raw[key]
        if _flavor()[0]:
            value = value[0]
        return clean(value)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.raw else default

    def blocks(self, key: str) -> list[Block]:
        return [Block(b) for b in self.raw.get(key, [])]

    def block(self, key: str) -> Block:
        found = self.blocks(key)
        assert len(found) == 1, f"expected one {key} block, found {len(found)}"
        return found[0]

    def dynamic(self, label: str) -> Block:
        for entry in self.raw.get("dynamic", []):
            for name, body in entry.items():
                if _unquote(name) == label:
                    return Block(body)
        raise KeyError(f"no dynamic {label!r} block")


class Config:
    """Every .tf file of a directory: resources, data, locals, variables, outputs, imports."""

    def __init__(self, directory: Path = TF_DIR) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, dict[str, Block]] = {}
        self.data: dict[str, dict[str, Block]] = {}
        self.locals: dict[str, Any] = {}
        self.variables: dict[str, Block] = {}
        self.outputs: dict[str, Block] = {}
        self.imports: list[Block] = []
        for path in sorted(directory.glob("*.tf")):
            with path.open() as f:
                parsed = hcl2.load(f)
            self.files[path.name] = parsed
            for kind, target in (("resource", self.resources), ("data", self.data)):
                for entry in parsed.get(kind, []):
                    for rtype, named in entry.items():
                        for name, body in named.items():
                            target.setdefault(_unquote(rtype), {})[_unquote(name)] = Block(body)
            for body in parsed.get("locals", []):
                block = Block(body)
                for key in block.raw:
                    self.locals[key] = block[key]
            for kind, target in (("variable", self.variables), ("output", self.outputs)):
                for entry in parsed.get(kind, []):
                    for name, body in entry.items():
                        target[_unquote(name)] = Block(body)
            self.imports.extend(Block(body) for body in parsed.get("import", []))

    def resource(self, rtype: str, name: str) -> Block:
        return self.resources[rtype][name]

    def all_resources(self) -> list[tuple[str, str, Block]]:
        return [(t, n, b) for t, named in self.resources.items() for n, b in named.items()]


def entry_points(main_py: Path = MAIN_PY) -> dict[str, str]:
    """The entry points of functions/main.py and their signature type (http | cloudevent)."""
    kinds = {"http": "http", "cloud_event": "cloudevent"}
    found: dict[str, str] = {}
    for node in ast.parse(main_py.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (
                isinstance(dec, ast.Attribute)
                and isinstance(dec.value, ast.Name)
                and dec.value.id == "functions_framework"
                and dec.attr in kinds
            ):
                found[node.name] = kinds[dec.attr]
    return found
