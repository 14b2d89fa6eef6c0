# nano3: `make smoke` runs the pipeline on the embedded default, `make test` runs the tests.
# NANO3_SYSTEM_PYTHON=1 uses the current Python instead of .venv (the NeMo container, a GPU machine).
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
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
           "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)

help:  ## list targets
	@grep -E '^[a-z -]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(SETUP)  ## create .venv from uv.lock (CPU stack; no GPU packages)
$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12)" >&2; exit 1; }
	$(UV) sync --frozen --python "$(PY312)"
	@touch $@

test: setup  ## run the tests (GPU tests skip without a GPU)
	python -m pytest -q $(PYTEST_ARGS)

smoke: setup  ## the whole pipeline on the embedded default (training needs a GPU or train.backend=reference)
	python -m nano3.launch.smoke

plan: setup  ## dry run of pretrain and lc: iterations, LR schedule, layout check, memory, GPU-hours
	python stages/pretrain.py --dry-run && python stages/lc.py --dry-run

sample tokenizer blend pretrain lc: setup  ## run one stage (and what it depends on) through DVC
	dvc repro $@

data: setup  ## sample -> tokenizer -> prep -> blend
	dvc repro blend

.PHONY: help setup test smoke plan sample tokenizer blend pretrain lc data
