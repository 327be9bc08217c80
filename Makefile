# mtlora: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
# Installed only when no torch is importable, so a machine with a CUDA build keeps it. On the project's
# machines this pin resolves to a local CPU wheel; elsewhere choose the build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
export MTLORA_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false
# One install stamp per set of extras: the runtime dependencies (`pip install -e .`) for running jobs, the
# dev extras (pytest, ruff, peft, DeepSpeed, the sweep plugins) for the tests, nevergrad for LoraHub.
STAMP := .make/install.stamp
DEV_STAMP := .make/install-dev.stamp
LORAHUB_INSTALL := .make/install-lorahub.stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev train smoke test test-full test-gpu lint format clean sync-wandb lorahub tables sweep-ranks

# Targets with a `## ` comment, pattern targets (table-%) included; colour only on a terminal.
help: ## list the targets
	@if [ -t 1 ]; then c='\033[36m'; r='\033[0m'; else c=; r=; fi; \
	grep -E '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | \
	awk -F':.*?## ' -v c="$$c" -v r="$$r" '{t=$$1; sub(/%$$/, "<paper>-<table>", t); printf "  %s%-22s%s %s\n", c, t, r, $$2}'

# $(call pip_install,<extras or empty>): torch first (only when none is importable), then mtlora (editable)
define pip_install
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_SPEC)
	$(PYTHON) -m pip install -e ".$(if $(1),[$(1)])"
	@mkdir -p .make && touch $@
endef

$(STAMP): pyproject.toml setup.py
	$(call pip_install,)

$(DEV_STAMP): pyproject.toml setup.py
	$(call pip_install,dev)

$(LORAHUB_INSTALL): pyproject.toml setup.py
	$(call pip_install,lorahub)

install: $(STAMP) ## install mtlora and its runtime dependencies (CPU torch only if no torch is installed)

install-dev: $(DEV_STAMP) ## install mtlora with the dev extras (tests, lint, peft, DeepSpeed, sweep plugins)

train: $(STAMP) ## run the embedded default job (tiny model, synthetic tasks, CPU, about 100 s of CPU time); ARGS="..." adds overrides
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

lorahub: $(LORAHUB_INSTALL) ## LoraHub: train one LoRA per task, then compose them (MODEL=tiny, SMOKE=1: a CPU check, about 25 s of CPU time; ARGS to both)
	$(PYTHON) -m mtlora.train -m model=$(MODEL) 'data.select=$(LORAHUB_SWEEP)' $(LORAHUB_TRAIN) \
		'hydra.sweep.dir=$(LORAHUB_DIR)/library' 'hydra.sweep.subdir=$${hydra.job.num}_$${data.select.0}' $(ARGS)
	$(PYTHON) -m mtlora.train model=$(MODEL) adapter=lorahub 'adapter.library_glob=$(LORAHUB_DIR)/library/*' \
		'data.select=$(LORAHUB_ALL)' $(LORAHUB_COMPOSE) 'hydra.run.dir=$(LORAHUB_DIR)/compose' $(ARGS)
	@echo "LoraHub composition: $(LORAHUB_DIR)/compose (weights and losses in metrics/lorahub.json)"

# Paper tables. `make table-<paper>-<table>` (ids of docs/paper_numbers.yaml; `align`, `hydra`, `mtl` are short
# for align_lora, hydralora, mtl_lora), e.g. `make table-align-t4 MODEL=qwen2.5-7b` = python -m
# mtlora.report.run_table (its doc has the details): every preset conf/experiment/<paper>/<table>/<cell>.yaml x
# SEEDS -> TABLES_DIR/<paper>_<table>/<model>/<cell>/s<seed>/ (a COMPLETED run is skipped, any other is resumed);
# Base rows (base.yaml) evaluate the base model once per model; LoraHub cells first train their library (one
# LoRA per task) under TABLES_DIR/lorahub_library/. Then scripts/make_tables.py writes
# REPORTS_DIR/<paper>_<table>/table.{md,csv,tex} (ours beside the paper's numbers) and TABLE_PLOTS (rank,
# lambda, heads, per-task). MODEL is passed only when given (else each preset's own model). ARGS: overrides for
# every run. Exit status 1 when a run failed (the report lists it). SMOKE=1: tiny model, synthetic data, a few
# steps, capped evals that need no network (BBH from MTLORA_DATA_DIR, MMLU from a tiny generated fixture).
# TABLE_DRY_RUN=1 prints the commands only.
TABLES_DIR ?= $(or $(MTLORA_OUTPUT_DIR),outputs)/tables
REPORTS_DIR ?= reports
TABLE_PLOTS ?= per-task
ifeq ($(SMOKE),1)
SEEDS ?= 0 1
else
SEEDS ?= 42 0 1
endif
TABLE_MODEL := $(if $(filter command line environment,$(origin MODEL)),$(MODEL))

table-%: $(LORAHUB_INSTALL) ## run all cells of a paper table x SEEDS, then its report (table-align-t4 MODEL=..., SMOKE=1)
	$(PYTHON) -m mtlora.report.run_table $* --seeds $(SEEDS) $(if $(TABLE_MODEL),--model $(TABLE_MODEL)) \
		$(if $(filter 1,$(SMOKE)),--smoke) $(if $(filter 1,$(TABLE_DRY_RUN)),--dry-run) \
		--runs-dir $(TABLES_DIR) --reports-dir $(REPORTS_DIR) $(foreach p,$(TABLE_PLOTS),--plot $(p)) -- $(ARGS)

tables: ## list the paper tables (make table-<paper>-<table>) and their presets
	@for d in conf/experiment/*/*/; do p=$$(basename $$(dirname $$d)); t=$$(basename $$d); \
		echo "  table-$$p-$$t: $$(ls $$d | sed 's/\.yaml$$//' | tr '\n' ' ')"; done

# Sweeps (conf/hparams_search/, Hydra multiruns) x SWEEP_SEEDS into one fixed dir (SWEEP_DIR, default
# outputs/sweeps/<name>_<model>_<time>), then scripts/make_tables.py writes REPORTS_DIR/sweep_<name>/
# {summary.md,summary.csv,<plot>.png}: sweep-ranks metric vs rank, sweep-lambda the λ sensitivity (metric vs
# alignment.weight), sweep-heads metric vs adapter.num_heads. They sweep what ARGS selects (experiment=...,
# adapter=...); without an experiment=, the preset's default: LoRA / A-LoRA-K / HydraLoRA on the tiny setup.
# MODEL is passed only when given (else the experiment's model). SMOKE=1: tiny model on synthetic data, 20
# steps, held-in eval only (a CPU check, also of experiment= presets whose data is on the hub).
# A failed job is marked FAILED and the sweep goes on; the failures are listed at the end and in
# <sweep dir>/failed_jobs.txt; the summary is written anyway, then the target exits 1.
.PHONY: sweep-lambda sweep-heads rerun-failed
SWEEP_SEEDS ?= 0
ifeq ($(SMOKE),1)
SWEEP_RUN := model=tiny data=synthetic debug=smoke model.max_seq_len=96 train.precision=fp32 \
	train.gradient_checkpointing=false train.micro_batch_size=8 train.gradient_accumulation_steps=1 \
	train.max_steps=20 'eval.suites=[heldin]' eval.max_examples_per_task=16
SWEEP_METRIC ?= heldin_token_acc
# the λ sweep's KL statistics come from a whole step (alignment.window=step): 2 rows x 5 micro-batches per task
SWEEP_LAMBDA_RUN := train.gradient_accumulation_steps=5
else
SWEEP_RUN := $(if $(TABLE_MODEL),model=$(TABLE_MODEL))
SWEEP_METRIC ?= heldin_exact_match
endif
sweep_dir = $(or $(SWEEP_DIR),$(or $(MTLORA_OUTPUT_DIR),outputs)/sweeps/$(1)_$(or $(TABLE_MODEL),$(if $(filter 1,$(SMOKE)),tiny,default))_$(LORAHUB_STAMP))
# $(call run_sweep,<name>,<hparams_search preset>,<config path grouped by>,<plot>[,<overrides after SWEEP_RUN>])
define run_sweep
	dir='$(call sweep_dir,$(1))'; \
	$(PYTHON) -m mtlora.train hparams_search=$(2) $(SWEEP_RUN) $(5) 'seed=$(subst $(space),$(comma),$(strip $(SWEEP_SEEDS)))' \
		"hydra.sweep.dir=$$dir" 'hydra.sweep.subdir=$${hydra.job.num}_$(1)-$${$(3)}_s$${seed}' $(ARGS); rc=$$?; \
	$(PYTHON) scripts/make_tables.py --runs "$$dir" --metric $(SWEEP_METRIC) --group-by $(3) --plot $(4) \
		--out $(REPORTS_DIR)/sweep_$(1) || exit 1; \
	exit $$rc
endef

sweep-ranks: $(STAMP) ## rank sweep (hparams_search=rank_sweep) + summary and metric-vs-rank plot (SMOKE=1: CPU)
	$(call run_sweep,ranks,rank_sweep,adapter.rank,rank)

sweep-lambda: $(STAMP) ## Align-LoRA λ sweep (hparams_search=lambda_sweep) + summary and λ-sensitivity plot
	$(call run_sweep,lambda,lambda_sweep,alignment.weight,lambda,$(SWEEP_LAMBDA_RUN))

sweep-heads: $(STAMP) ## head-count sweep (hparams_search=head_sweep; ARGS=experiment=|adapter=) + metric-vs-heads plot
	$(call run_sweep,heads,head_sweep,adapter.num_heads,heads)

rerun-failed: $(STAMP) ## rerun a sweep's failed jobs in their run dirs with resume=auto (SWEEP=<sweep dir>)
	@test -n "$(SWEEP)" || { echo "usage: make rerun-failed SWEEP=<sweep dir> [ARGS=extra overrides]"; exit 2; }
	$(PYTHON) -m mtlora.run.callbacks rerun "$(SWEEP)" $(ARGS)

# pytest-xdist: TEST_WORKERS processes (default: one per CPU; TEST_WORKERS=0 runs in this process); a test
# file stays on one worker (--dist loadfile), so its module-scoped fixtures (trained runs) are built once.
TEST_WORKERS ?= logical
PYTEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(DEV_STAMP) ## the CPU test suite (what CI runs; slow and GPU tests excluded; TEST_WORKERS=N)
	$(PYTHON) -m pytest $(PYTEST_XDIST) $(ARGS)

test-full: $(DEV_STAMP) ## every CPU test, the slow ones included
	$(PYTHON) -m pytest $(PYTEST_XDIST) -m "not gpu" $(ARGS)

test-gpu: $(DEV_STAMP) ## the GPU tests (needs CUDA)
	$(PYTHON) -m pytest -m gpu $(ARGS)

.PHONY: preset-health
preset-health: $(STAMP) ## every paper preset trains: 30 smoke steps each vs plain LoRA (scripts/preset_health.py; ARGS="--presets 'rlora/*'")
	$(PYTHON) scripts/preset_health.py $(ARGS)

.PHONY: test-experiments
test-experiments: $(DEV_STAMP) ## every paper-table preset composes and trains 2 steps (tiny model); a SMOKE table end to end
	$(PYTHON) -m pytest -m "slow or not slow" tests/integration/test_experiments.py $(ARGS)

# lint-imports (import-linter): the package layering contracts of pyproject.toml [tool.importlinter], see
# docs/architecture.md. Run through $(PYTHON), whose scripts folder may not be on PATH.
LINT_IMPORTS = $(PYTHON) -c 'from importlinter.cli import lint_imports_command as main; main()'

lint: $(DEV_STAMP) ## ruff lint + format check, then the import layering contracts (lint-imports)
	$(PYTHON) -m ruff check mtlora tests scripts
	$(PYTHON) -m ruff format --check mtlora tests scripts
	$(LINT_IMPORTS) --no-cache --no-logo

format: $(DEV_STAMP) ## ruff fix + format
	$(PYTHON) -m ruff check --fix mtlora tests scripts
	$(PYTHON) -m ruff format mtlora tests scripts

sync-wandb: ## upload offline wandb runs (logger=wandb_offline) from outputs/ (or $MTLORA_OUTPUT_DIR)
	@find "$${MTLORA_OUTPUT_DIR:-outputs}" -type d -name 'offline-run-*' -print0 | xargs -0 -r wandb sync

clean: ## remove outputs/ and caches
	rm -rf outputs multirun .make .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
