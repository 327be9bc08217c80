# mtlora: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
# Installed only when no torch is importable, so a machine with a CUDA build keeps it. On the project's
# machines this pin resolves to a local CPU wheel; elsewhere choose the build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
export MTLORA_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false
STAMP := .make/install.stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train smoke test test-full test-gpu lint format clean sync-wandb lorahub

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_SPEC)
	$(PYTHON) -m pip install -e ".[dev]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP) ## install mtlora and its dependencies (CPU torch only if no torch is installed)

train: $(STAMP) ## run the embedded default job (tiny model, synthetic tasks, CPU, ~2 min); ARGS="..." adds overrides
	$(PYTHON) -m mtlora.train $(ARGS)

smoke: $(STAMP) ## a few steps of the default job (debug=smoke)
	$(PYTHON) -m mtlora.train debug=smoke $(ARGS)

# LoraHub: one LoRA per task (a Hydra multirun over data.select), then their gradient-free composition
# (conf/adapter/lorahub.yaml). Everything lands in LORAHUB_DIR: library/<job>/ and compose/.
MODEL ?= tiny
SMOKE ?=
LORAHUB_TASKS ?= arithmetic word_sorting boolean_expressions counting
LORAHUB_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
LORAHUB_DIR ?= $(or $(MTLORA_OUTPUT_DIR),outputs)/lorahub/$(MODEL)_$(LORAHUB_STAMP)
comma := ,
empty :=
space := $(empty) $(empty)
LORAHUB_SWEEP = $(subst $(space),$(comma),$(foreach t,$(LORAHUB_TASKS),[$(t)]))
LORAHUB_ALL = [$(subst $(space),$(comma),$(strip $(LORAHUB_TASKS)))]
ifeq ($(SMOKE),1)
LORAHUB_TRAIN := debug=smoke train.max_steps=40 data.budget=320 eval=none
LORAHUB_COMPOSE := debug=smoke adapter.budget=12 eval.max_examples_per_task=16
else
LORAHUB_TRAIN := eval.max_examples_per_task=64
LORAHUB_COMPOSE :=
endif

lorahub: $(STAMP) ## LoraHub: train one LoRA per task, then compose them (MODEL=tiny, SMOKE=1: a CPU check in ~2 min; ARGS to both)
	$(PYTHON) -m mtlora.train -m model=$(MODEL) 'data.select=$(LORAHUB_SWEEP)' $(LORAHUB_TRAIN) \
		'hydra.sweep.dir=$(LORAHUB_DIR)/library' 'hydra.sweep.subdir=$${hydra.job.num}_$${data.select.0}' $(ARGS)
	$(PYTHON) -m mtlora.train model=$(MODEL) adapter=lorahub 'adapter.library_glob=$(LORAHUB_DIR)/library/*' \
		'data.select=$(LORAHUB_ALL)' $(LORAHUB_COMPOSE) 'hydra.run.dir=$(LORAHUB_DIR)/compose' $(ARGS)
	@echo "LoraHub composition: $(LORAHUB_DIR)/compose (weights and losses in metrics/lorahub.json)"

test: $(STAMP) ## the CPU test suite (what CI runs; slow and GPU tests excluded)
	$(PYTHON) -m pytest $(ARGS)

test-full: $(STAMP) ## every CPU test, the slow ones included
	$(PYTHON) -m pytest -m "not gpu" $(ARGS)

test-gpu: $(STAMP) ## the GPU tests (needs CUDA)
	$(PYTHON) -m pytest -m gpu $(ARGS)

lint: $(STAMP) ## ruff lint + format check
	$(PYTHON) -m ruff check mtlora tests scripts
	$(PYTHON) -m ruff format --check mtlora tests scripts

format: $(STAMP) ## ruff fix + format
	$(PYTHON) -m ruff check --fix mtlora tests scripts
	$(PYTHON) -m ruff format mtlora tests scripts

sync-wandb: ## upload offline wandb runs (logger=wandb_offline) from outputs/ (or $MTLORA_OUTPUT_DIR)
	@find "$${MTLORA_OUTPUT_DIR:-outputs}" -type d -name 'offline-run-*' -print0 | xargs -0 -r wandb sync

clean: ## remove outputs/ and caches
	rm -rf outputs multirun .make .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
