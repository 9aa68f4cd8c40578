# visionflow — the two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params/default.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export NO_ALBUMENTATIONS_UPDATE ?= 1

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install  ## train, evaluate and track the default job (bundled digits)
	$(BIN)/visionflow run --params $(PARAMS)

test: install  ## every test, the slow end-to-end ones included
	$(BIN)/python -m pytest

test-fast: install  ## all but the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

bench: install  ## overhead of the pipeline against a plain PyTorch loop
	$(BIN)/python bench/train_overhead.py

clean:
	rm -rf runs .visionflow mlflow.db mlartifacts
