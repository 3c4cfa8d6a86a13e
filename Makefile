# The front door. `make demo` and `make test` work on a fresh clone with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-latest faults lint typecheck bench docs lock clean

# CI and `make test` install the versions pinned in constraints.txt (written by `make lock`);
# pyproject.toml keeps open ranges for users. `make test-latest` tries the newest releases.
CONSTRAINTS ?= -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(CONSTRAINTS) --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[dev,interop]'
	touch $(STAMP)

## Run the demo on the embedded SQLite default: a worker in the background, three tasks.
demo: $(STAMP)
	cd examples/demo && ../../$(BIN)/python run_demo.py

## Run the whole test suite (servers that are down are skipped, loudly). The unit tests (memory
## broker, no server) run beside the others, which mostly wait on servers and workers: CI's
## 30 minutes. Their report follows the others'.
test: $(STAMP)
	@$(BIN)/python -m pytest -p no:cacheprovider t/unit > unit-tests.log 2>&1 & unit=$$!; \
	$(BIN)/python -m pytest t/integration t/interop t/faults; rest=$$?; \
	wait $$unit; unit_rc=$$?; cat unit-tests.log; \
	echo "make test: t/unit exited $$unit_rc; t/integration, t/interop, t/faults exited $$rest"; \
	test $$rest -eq 0 && test $$unit_rc -eq 0

test-unit: $(STAMP)
	$(BIN)/python -m pytest t/unit

## The fault-injection suite alone (real servers, real workers, a fault proxy; `make test` runs
## it once too). A soak: `make faults FAULTS_ARGS=--repeat=20`; summaries go to faults-results.txt.
faults: $(STAMP)
	TASKFRAME_REQUIRE_SERVICES=1 $(BIN)/python -m pytest t/faults $(FAULTS_ARGS)

## ruff; the import-linter contracts of setup.cfg (the layers); no import cycle, no module
## over 500 lines, no function over 60 (tools/check_layout.py).
lint: $(STAMP)
	$(BIN)/ruff check taskframe transport backends t examples tools
	LINT_IMPORTS=$(abspath $(BIN))/lint-imports tools/lint-imports.sh
	$(BIN)/python tools/check_layout.py

typecheck: $(STAMP)
	MYPY=$(abspath $(BIN))/mypy tools/typecheck.sh

## Re-resolve constraints.txt to the newest releases that pyproject.toml allows.
lock: $(STAMP)
	$(BIN)/pip-compile -q --upgrade --strip-extras --allow-unsafe --extra dev --extra interop \
		--no-emit-index-url --no-emit-find-links -o constraints.txt pyproject.toml
	# the dev extra names taskframe itself: pip-compile pins it to this folder; a constraint
	# must not (pip would look for that file in every other clone).
	sed -i '/^taskframe @ /{N;d}' constraints.txt

## The tests and the type check against the newest releases, in a venv of their own (.venv-latest).
test-latest:
	$(MAKE) VENV=.venv-latest CONSTRAINTS= STAMP=.venv-latest/.installed-latest \
		.venv-latest/.installed-latest
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev,interop]'
	$(MAKE) VENV=.venv-latest CONSTRAINTS= STAMP=.venv-latest/.installed-latest test typecheck

## taskframe's worker vs Celery's on RabbitMQ and Redis; `make bench BENCH_ARGS=--quick` for a check.
bench: $(STAMP)
	$(BIN)/python t/benchmarks/run.py $(BENCH_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf build site .venv-latest .pytest_cache .mypy_cache .ruff_cache examples/demo/taskframe.sqlite3*
