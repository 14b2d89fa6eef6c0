# nano3: `make smoke` runs the pipeline on the embedded default, `make test` runs the tests.
# Stages run here (EXECUTOR=local, the default) or on a Slurm cluster (CLUSTER=<name> from clusters.toml).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
           "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
DATASETS := $(shell $(VENV)/bin/python -c 'import yaml; print(" ".join(yaml.safe_load(open("params.yaml"))["datasets"]))' 2>/dev/null)

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.synced  ## create .venv from uv.lock (CPU stack; no GPU packages)
$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12)" >&2; exit 1; }
	$(UV) sync --frozen --python "$(PY312)"
	@touch $@

test: setup  ## run the test suite (GPU tests skip on CPU; Slurm tests start the bundled test cluster)
	python -m pytest -q $(PYTEST_ARGS)

sample tokenizer blend: setup  ## run one stage through DVC
	dvc repro --single-item $@
prep: setup  ## tokenize every dataset in params.yaml
	dvc repro $(addprefix prep@,$(DATASETS))
data: setup  ## sample -> tokenizer -> prep -> blend
	dvc repro blend

.PHONY: help setup test sample tokenizer prep blend data
