# The two commands a newcomer types: `make run` (the demo pipeline) and `make test` (what CI runs).
# Each sets up what it needs (.venv, packages, demo data) and is safe to run twice.
# Two test lanes: `make test-fast` for the edit loop (no `slow` or `pretrained` tests: no servers, no
# Prefect or DVC pipelines, no real weights; 2-3 minutes on 2 busy cores) and `make test`, everything,
# what CI runs (.ci/run), ending with the 15 slowest tests.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/raw
DEMO_PER_CLASS ?= 400
PYTEST_ARGS ?=

export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 \
       PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: run test test-fast venv data repro bench lint clean

run: venv data  ## the demo: train, evaluate, export and register a model on the built-in data
	$(BIN)/headstart run --data $(DATA)

test: venv  ## the test suite, everything (what CI runs)
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: venv  ## the edit loop: unit tests and each stage on tiny data, without `slow` and `pretrained`
	$(BIN)/python -m pytest -m "not slow and not pretrained" --durations=15 $(PYTEST_ARGS)

venv: $(VENV)/.installed

# torch 2.14.1 / torchvision 0.29.1 come from this machine's disk through pip; the rest from PyPI,
# at the versions in requirements/constraints.txt. tritonclient only for its ModelConfig schema (export-triton's
# check), without its dependencies: its grpc extra pins an older protobuf than ours.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "pip==26.3"
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps -c requirements/constraints.txt tritonclient
	touch $@

data: venv  ## materialise the built-in demo data set when the data folder is empty
	@if [ -z "$$(ls -A $(DATA) 2>/dev/null)" ]; then \
	  $(BIN)/headstart data pull elpv --task defect --per-class $(DEMO_PER_CLASS) --out $(DATA); \
	else echo "$(DATA) has data; using it"; fi

repro: venv data  ## the same pipeline through DVC
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

bench: venv  ## benchmarks (not tests): print JSON reports
	$(BIN)/python -m benchmarks.manifest
	$(BIN)/python -m benchmarks.features
	$(BIN)/python -m benchmarks.scale --markdown
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.first_run --markdown
	$(BIN)/python -m benchmarks.runtime
	$(BIN)/python -m benchmarks.serving
	$(BIN)/python -m benchmarks.finetune
	$(BIN)/python -m benchmarks.transfer --plot docs/transfer_curves.png
	$(BIN)/python -m benchmarks.abstention --markdown docs/abstention.md

lint: venv
	$(BIN)/ruff check headstart tasks flows tests benchmarks

clean:  ## remove outputs (keeps .venv, data and the MLflow store)
	rm -rf artifacts .cache/headstart
