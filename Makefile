# Every target a developer, the README and CI call. `.venv` is the only set-up step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format bench chaos faults stack clean

$(VENV): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $(VENV)

demo: $(VENV)
	$(BIN)/kling demo --out out/demo.mp4

test: $(VENV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config api workers sandbox clients/python/kling_client
	$(BIN)/pytest

lint: $(VENV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config api workers sandbox clients/python/kling_client

format: $(VENV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)
	$(BIN)/python -m bench

stack: $(VENV)
	$(BIN)/kling stack up

clean:
	rm -rf $(VENV) .stack out .pytest_cache .mypy_cache .ruff_cache

chaos: $(VENV)
	$(BIN)/python -m bench.chaos

faults: $(VENV)
	$(BIN)/python -m bench.faults
