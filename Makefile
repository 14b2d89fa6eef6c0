# nano3: `make smoke` runs the pipeline on the embedded default, `make test` runs the tests.
# CLUSTER=<profile in stages/clusters.toml> submits stages to Slurm (WAIT=1 waits for them through DVC).
# NANO3_SYSTEM_PYTHON=1 uses the current Python instead of .venv (inside the NeMo container, GPU machines).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
ifeq ($(NANO3_SYSTEM_PYTHON),1)
SETUP :=
else
SETUP := $(VENV)/.synced
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
endif
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
# A Python 3.12 by absolute path, outside any virtualenv (an active one's interpreter would make uv look
# for a managed CPython to download); an active foreign virtualenv is otherwise ignored.
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
           "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys._base_executable)' 2>/dev/null \
           && break; done)
unexport VIRTUAL_ENV
LAUNCH := python -m nano3.launch
# DVC records its lineage against params.yaml, so make reads that file only (stage scripts and plan take --params).
ifneq ($(PARAMS),)
ifneq ($(filter-out plan help,$(or $(MAKECMDGOALS),help)),)
$(error make and DVC read params.yaml (dvc.lock's lineage): cp $(PARAMS) params.yaml, or PARAMS= with make plan only)
endif
endif
# make <stage>: here through DVC; with CLUSTER, a job (its id is printed; `dvc commit <stage>` records it when
# done); WAIT=1 waits, streams its log and returns its exit code. `CLUSTER=x dvc repro` waits through DVC.
# params.yaml is checked first: DVC's own error for a bad datasets entry does not name the key.
run = $(if $(CLUSTER),$(LAUNCH) submit $(1) --cluster $(CLUSTER) $(if $(WAIT),--wait),$(CHECK) && dvc repro $(2))
CHECK := python -m nano3.config params.yaml >/dev/null

help:  ## list targets
	@grep -E '^[a-z -]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-24s %s\n", $$1, $$2}'

setup: $(SETUP)  ## create .venv from uv.lock (CPU stack; no GPU packages)
$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12)" >&2; exit 1; }
	$(UV) sync --frozen --python "$(PY312)"
	@touch $@

# make test: unit tests on up to 4 cores, then the integration tests (DVC, Slurm) one at a time, as they share the
# machine's cores and time limits; PYTEST_ARGS="..." runs one pytest with those arguments instead.
test: setup  ## run the tests (GPU tests skip without a GPU; Slurm tests start a local test cluster as root)
	$(if $(PYTEST_ARGS),python -m pytest -q $(PYTEST_ARGS),python -m pytest -q -n auto --maxprocesses 4 tests/unit && \
	  python -m pytest -q tests/integration tests/gpu)

smoke: setup  ## the whole pipeline on the embedded default (Megatron on GPUs, the CPU reference elsewhere)
	python -m nano3.launch.smoke

PLAN := --dry-run $(if $(BRIDGE),--bridge-fields) $(if $(PARAMS),--params $(PARAMS))
plan: setup  ## dry run of pretrain and lc: layout, memory, GPU-hours, recipe check (STRICT=1 pinned data, BRIDGE=1 fields)
	python stages/pretrain.py $(PLAN) $(if $(STRICT),--strict) && python stages/lc.py $(PLAN) && \
	python -m nano3.train.conform --recipe-only

conform: setup  ## what the last runs used (read back from their live objects) vs params.yaml vs the recipe
	python -m nano3.train.conform

sample retrieval tokenizer blend pretrain lc export eval: setup  ## run one stage (and what it needs), here or on CLUSTER
	$(call run,$@,$@)

prep: setup  ## tokenize every dataset of params.yaml (on CLUSTER: a job or job array per dataset)
	$(call run,prep,$(addprefix prep@,$(shell python -c 'import yaml; print(" ".join(yaml.safe_load(open("params.yaml"))["datasets"]))')))

all: setup  ## the whole pipeline: here through DVC, or on CLUSTER as jobs chained with afterok
	$(if $(CLUSTER),$(LAUNCH) all --cluster $(CLUSTER),$(CHECK) && dvc repro eval)

exps: setup  ## the experiments as a table that fits the terminal: changed params, headline metrics
	$(LAUNCH) exps

apply: setup  ## EXP=<name>: make the workspace that experiment's, models included (dvc exp apply, then dvc repro)
	@test -n "$(EXP)" || { echo "error: make apply EXP=<experiment name> (dvc exp show lists them)" >&2; exit 2; }
	dvc exp apply $(EXP) && dvc repro eval

verify-data: setup  ## prepared shards vs their manifests: sizes (seconds); SHA256=1 reads every byte
	python -m nano3.data.shards $(if $(SHA256),--sha256)

prune-data: setup  ## shard versions and removed datasets' folders params.yaml no longer uses; APPLY=1 removes
	python -m nano3.data.shards --prune $(if $(APPLY),--apply)

clean-runs: setup  ## remove checkpoints no commit, experiment or workspace refers to (DRY=1 lists them)
	python -m nano3.train.reclaim $(if $(DRY),--dry-run)

status cancel logs: setup  ## this repo's Slurm jobs, last checkpoints and metrics | cancel them | follow a log
	$(LAUNCH) $@ $(JOB)

container:  ## build the image (FROM the NeMo container) with docker, enroot or apptainer (RUNTIME=...)
	containers/build.sh $(RUNTIME)

.PHONY: help setup test smoke plan conform sample retrieval tokenizer prep blend pretrain lc export eval all exps apply \
        verify-data prune-data clean-runs status cancel logs container
