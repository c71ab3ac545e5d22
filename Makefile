.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= anthropic.claude-3-haiku-20240307-v1:0
OUT ?= out

export PREFECT_SERVER_ANALYTICS_ENABLED := false

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extras

run: $(STAMP) ## run the batch flow on the bundled sample data, on the local stack
	rm -rf $(OUT)/sample-jokes  # the local stack is new each time, so is the run
	$(BIN)/bedrock-batch run --local-stack \
		--source data/topics.csv --prompt-id joke_about_topic --model-id $(MODEL) \
		--output-uri $(OUT) --run-name sample-jokes --max-concurrent-jobs 2

# Test workers: the suite mostly waits (on subprocess runs, paced jobs, Prefect's 60 s lease),
# using ~0.75 of 2 cores in one process; each worker has its own Prefect server and local stack.
TEST_WORKERS ?= 4

test: $(STAMP) ## run the test suite (local stack and Prefect test server included)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 --durations=15

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

local: $(STAMP) ## start the local stack and print the export lines
	$(BIN)/python -m emulator

bench: $(STAMP) ## speed and memory benchmarks (prints figures, appends CSV)
	$(BIN)/python -m benchmarks.bench_preprocess
	$(BIN)/python -m benchmarks.bench_merge
	$(BIN)/python -m benchmarks.bench_emulator

bench-orch: $(STAMP) ## orchestration benchmarks: refill (45 jobs, gate 20) and 200 shards
	$(BIN)/python -m benchmarks.bench_orchestration --scenario refill
	$(BIN)/python -m benchmarks.bench_orchestration --scenario scale --shards 200 --gate 20

clean: ## remove outputs (keeps .venv)
	rm -rf $(OUT) .pytest_cache

.PHONY: help install run test lint local bench bench-orch clean
