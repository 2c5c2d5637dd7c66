# Two commands matter: `make load-optimized` runs the main job, `make test` the tests.
# Both install what they need into .venv and start private PostgreSQL/Redis servers
# (scripts/services.sh) unless DATABASE_URL and REDIS_URL point at servers already.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES := scripts/services.sh
REPORTS := reports

.PHONY: help install test lint load-optimized load-baseline compare bench up down \
	check-config

help:
	@echo "make load-optimized   headless run of configs/optimized.yaml"
	@echo "make load-baseline    headless run of configs/baseline.yaml (overcommitted)"
	@echo "make compare          baseline then optimized, side by side, with a plot"
	@echo "make test             the test suite against real PostgreSQL and Redis"
	@echo "make lint             ruff and mypy"
	@echo "make bench            the harness against pgbench (several minutes)"
	@echo "make up / make down   start / stop the private servers for the web UI"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(SERVICES) run $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

load-optimized: install
	$(SERVICES) run scripts/load.sh configs/optimized.yaml

# The baseline cannot fit the server: that is what it is for, so it runs with
# overcommit allowed, to reproduce the exhaustion.
load-baseline: install
	$(SERVICES) run scripts/load.sh configs/baseline.yaml --cdc-allow-overcommit

compare: install
	$(SERVICES) run $(BIN)/python -m scripts.compare

bench: install
	$(SERVICES) run $(BIN)/python -m scripts.bench $(BENCH_ARGS)

check-config: install
	$(BIN)/cdc-load check-config --profile $(or $(PROFILE),configs/optimized.yaml)

up:
	@$(SERVICES) up

down:
	@$(SERVICES) down
