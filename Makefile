# Every target a developer, the README and CI call. `.venv` is the only set-up step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format bench chaos faults stack clean .browser

$(VENV): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $(VENV)

demo: $(VENV)
	$(BIN)/kling demo --out out/demo.mp4

# Two pytest workers, each with an embedded stack of its own: the tests mostly wait on their
# stack, so two share the two cores; a module's tests stay together (module fixtures).
test: $(VENV) .browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config api workers sandbox bench clients/python/kling_client
	$(BIN)/pytest -n 2 --dist loadfile

# The console's browser tests drive Debian's Chromium (never a downloaded browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.browser:
	@command -v chromium >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

lint: $(VENV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config api workers sandbox bench clients/python/kling_client

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
