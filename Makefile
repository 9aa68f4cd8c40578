# visionflow — the two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params/default.yaml
# Tests run in one process per CPU (at most 4), a whole test file per process: its module fixtures start once.
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
# The offline defaults (no telemetry, no update checks) are set by visionflow itself: components/quiet.py.

.PHONY: install browser run up down deploy lint test test-fast bench bench-overhead bench-techniques bench-compress clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install  ## train, evaluate and track the default job (bundled digits)
	$(BIN)/visionflow run --params $(PARAMS)

lint: install  ## ruff: lint and format check (a finding fails `make test`)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

browser:  ## Debian's chromium, for the test that opens both UIs in a headless browser (apt-get, as root)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing and cannot be installed here (needs apt-get as root): the browser test will fail"

test: install lint browser  ## lint, then every test, the slow end-to-end ones included
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

test-fast: install lint browser  ## lint, then all but the slow end-to-end tests
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

bench: bench-overhead bench-techniques bench-compress  ## all three benchmarks (tables on stdout)

bench-overhead: install  ## train stage and whole pipeline against a plain PyTorch loop
	$(BIN)/python bench/train_overhead.py

bench-techniques: install  ## every model family and optimizer on digits, one MLflow experiment (TECHNIQUES_ARGS="--epochs 3")
	$(BIN)/python bench/techniques.py $(TECHNIQUES_ARGS)

bench-compress: install  ## int8, pruning and distillation of the default model against the targets (COMPRESS_ARGS="--from-run ID")
	$(BIN)/python bench/compress.py $(COMPRESS_ARGS)

up: install  ## local Prefect + MLflow servers on loopback (UIs at :4200 and :5000)
	$(BIN)/visionflow up

down:  ## stop the servers `make up` started
	$(BIN)/visionflow down

deploy: install  ## serve the deployments (pipeline, retrain on its schedule, stages) to the stack of `make up`
	$(BIN)/visionflow deploy --params $(PARAMS)

clean:
	rm -rf runs .visionflow mlflow.db mlartifacts
