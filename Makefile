# make dev   — the whole system locally (embedded Postgres, Cloud Tasks emulator, SMS sink, functions)
# make test  — installs what it needs, then lint, types and every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EMU_VENV := .venv-emulator
PYTEST_WORKERS ?= 2
# make dev DEV_ARGS="--no-demo" (or --exit-after-demo, --free-ports, --workdir DIR): the stack's flags.
DEV_ARGS ?=

.PHONY: dev test install lint typecheck unit clean bench

# Two stamps on one venv: make dev installs the runtime and the local stack's extra only (.[local]);
# everything else (make test, lint, bench, bundle) installs the test toolchain on top (.[local,dev]),
# which also satisfies make dev.
$(VENV)/.local: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local,dev]'
	touch $@ $(VENV)/.local

# The Cloud Tasks emulator pins protobuf<5, which the real clients cannot share: its own venv.
$(EMU_VENV)/.installed:
	$(PYTHON) -m venv $(EMU_VENV)
	$(EMU_VENV)/bin/python -m pip install -q --upgrade pip
	$(EMU_VENV)/bin/python -m pip install -q 'gcloud-tasks-emulator==0.6.2' 'protobuf<5'
	touch $@

install: $(VENV)/.installed $(EMU_VENV)/.installed

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

test: install lint typecheck
	CLOUD_TASKS_EMULATOR_PYTHON=$(CURDIR)/$(EMU_VENV)/bin/python \
	  $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests

unit: $(VENV)/.installed
	$(BIN)/python -m pytest tests/unit

bench: install
	$(BIN)/python -m bench

dev: $(VENV)/.local $(EMU_VENV)/.installed
	CLOUD_TASKS_EMULATOR_PYTHON=$(CURDIR)/$(EMU_VENV)/bin/python $(BIN)/python -m shared.dev.stack $(DEV_ARGS)

clean:
	rm -rf $(VENV) $(EMU_VENV) .dev .pytest_cache .mypy_cache .ruff_cache

# The Cloud Functions source bundle: main.py, the shared package and a pinned requirements.txt.
.PHONY: bundle
bundle: $(VENV)/.installed
	$(BIN)/python infra/bundle.py --output dist/function-source.zip
