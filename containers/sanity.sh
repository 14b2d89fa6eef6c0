#!/bin/bash
# The image's sanity step (Dockerfile, apptainer.def and build.sh's enroot path run it from a copy of the
# checkout): Bridge's Nemotron 3 Nano recipe, our training entry module and dvclive import; what this Bridge
# can do is printed (megatron_compat); the production config plans (`stages/pretrain.py --dry-run`).
set -euo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NANO3_SYSTEM_PYTHON=1
python -c "from megatron.bridge.recipes.nemotronh.nemotron_3_nano import nemotron_3_nano_pretrain_config; import nano3.train.entry, dvclive"
python -m nano3.launch.image --full
python stages/pretrain.py --dry-run --params configs/nano3.yaml
# export and eval's transformers (the side folder where the image's lacks NemotronH)
side=${NANO3_NEMOTRON_H_DIR:-/opt/nano3/nemotron-h}; [ -f "$side/INSTALLED.txt" ] || side=""
PYTHONPATH="${side:+$side:}$PYTHONPATH" python -c \
  "from nano3.megatron_compat import nemotron_h_classes; import transformers; nemotron_h_classes(); print('export/eval: transformers', transformers.__version__, 'with NemotronH')"
