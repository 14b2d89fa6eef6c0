#!/bin/bash
# The image's sanity step (Dockerfile, apptainer.def and build.sh's enroot path run it from a copy of the
# checkout): Bridge's Nemotron 3 Nano recipe, our training entry module and dvclive import; what this Bridge
# can do is printed (megatron_compat); the production config plans (`stages/pretrain.py --dry-run`).
set -euo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NANO3_SYSTEM_PYTHON=1
python -c "from megatron.bridge.recipes.nemotronh.nemotron_3_nano import nemotron_3_nano_pretrain_config; import nano3.train.entry, dvclive"
python -m nano3.launch.image --full
python stages/pretrain.py --dry-run --params configs/nano3.yaml
