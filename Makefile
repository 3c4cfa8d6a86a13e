# The front door. `make demo` and `make test` work on a fresh clone with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint typecheck bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,interop]'
	touch $(STAMP)

## Run the demo on the embedded SQLite default: a worker in the background, three tasks.
demo: $(STAMP)
	cd examples/demo && ../../$(BIN)/python run_demo.py

## Run the whole test suite (servers that are down are skipped, loudly).
test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest t/unit

lint: $(STAMP)
	$(BIN)/ruff check taskframe transport backends t examples

typecheck: $(STAMP)
	tools/typecheck.sh

## taskframe's worker vs Celery's on RabbitMQ and Redis; `make bench BENCH_ARGS=--quick` for a check.
bench: $(STAMP)
	$(BIN)/python t/benchmarks/run.py $(BENCH_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf build site .pytest_cache .mypy_cache .ruff_cache examples/demo/taskframe.sqlite3*
