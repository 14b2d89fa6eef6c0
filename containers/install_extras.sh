#!/bin/bash
# nano3's packages (a requirements file) installed into an image's Python without moving its training stack: the
# installed torch, Megatron, Transformer Engine, mamba-ssm, causal-conv1d, numpy and triton are written to
# CONSTRAINTS and pinned. The one place this is done: Dockerfile, apptainer.def, build.sh (enroot) and
# stages/in_image.sh (profile image_extras = "install", with --target) all call it.
#   bash containers/install_extras.sh REQUIREMENTS CONSTRAINTS [pip install options...]
set -euo pipefail
requirements=$1 constraints=$2
shift 2
pip freeze | grep -iE '^(torch|megatron|transformer.engine|mamba.ssm|causal.conv1d|numpy|triton)' > "$constraints" || true
pip install --no-cache-dir -c "$constraints" -r "$requirements" "$@"
