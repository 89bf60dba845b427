# Two commands on a fresh machine: `make demo` (quickstart) and `make test` (the whole suite).
# Both create .venv and install everything first (scripts/setup.sh; idempotent).
PY := .venv/bin/python
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0

.PHONY: setup demo test bench
setup:
	./scripts/setup.sh

demo: setup
	$(PY) run.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m fedmoe_flwr.bench --quick
