# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# The virtual environment is rebuilt only when requirements.lock (the single source of truth) changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GRID ?= params/demo.yaml
PYTEST_ARGS ?=
export SLF_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: test test-all demo lab lint format venv clean-venv

venv: $(STAMP)

# torch/torchvision/torchaudio are pinned in the lock like everything else; the packages in requirements-nodeps.txt
# declare dependencies that conflict with the stack (see SPEC §8), so they go in without them.
$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	@test -x $(PY) && $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two tiers: `make test` (lint, unit and integration tests; under 10 minutes) after every change, `make test-all`
# (the end-to-end tier too: grids, papermill runs, faults, benchmarks, the known-answer bench) in CI.
test: lint
	$(PY) -m pytest tests/unit tests/integration -m "not slow" $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m slf_utils.grid run $(GRID)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean-venv:
	rm -rf $(VENV)
