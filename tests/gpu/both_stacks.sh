#!/bin/bash
# The GPU smoke and GPU tests on two training stacks side by side, one GPU each, detached so that they outlive
# one remote command (poll with `status`):
#   bash tests/gpu/both_stacks.sh start ['pytest -k expression']     then     bash tests/gpu/both_stacks.sh status
# Lane "current": ../shared/gpu's stack on GPU 0. Lane "older": tests/gpu/older_stack.sh's on GPU 1 (on GPU 0 too
# where the machine has one GPU: the smoke's models are small enough to share it).
# Each lane keeps its smoke copy in /root/smoke-<lane> (NANO3_GPU_SMOKE_DIR) and logs to /root/lane-<lane>.log.
# LANES="older" starts only the lanes named; K_CURRENT / K_OLDER give one lane its own -k expression.
# SMOKE_EDIT="dotted.key=yaml-value ..." edits each new smoke copy's params.yaml first, e.g.
# SMOKE_EDIT="train.kernels.fused_mamba=false" where causal-conv1d is not built.
set -uo pipefail
ROOT=$(pwd)
K=${2:-"loss_falls or blend_switch or lr_curve or lc_starts or exported or effective_config or production_config or without_callbacks"}
lane_path() { if [ "$1" = older ]; then echo "${OLDER_SITE:-/root/older-site}:$ROOT/src"; else echo "$ROOT/src"; fi; }
# The older lane is the recipe image's stand-in: a job there runs with image_extras = "install", and export and eval
# install their side folder (transformers 5) from the wheels older_stack.sh prepared (the machine has no index).
lane_env() { if [ "$1" = older ]; then echo "NANO3_IMAGE_EXTRAS=install PIP_NO_INDEX=1 PIP_FIND_LINKS=$ROOT/.dev-older/side"; fi; }
case "${1:-}" in
  start)
    gpu=0; ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true; [ "${ngpus:-0}" -ge 1 ] || ngpus=1
    for lane in current older; do
      if [ -n "${LANES:-}" ] && [[ " $LANES " != *" $lane "* ]]; then gpu=$((gpu + 1)); continue; fi
      dir=/root/smoke-$lane
      if [ ! -f "$dir.ready" ]; then  # a copy whose edits were not all made is made again
        rm -rf "$dir"
        PYTHONPATH=$ROOT/src:$ROOT python3 - "$dir" ${SMOKE_EDIT:-} <<'PY'
import sys
from pathlib import Path

import yaml

from tests.conftest import copy_repo
from tests.gpu.test_training_gpu import edit_params

repo = copy_repo(Path(sys.argv[1]))
edit_params(repo, {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in sys.argv[2:])})
PY
        [ $? = 0 ] || { echo "error: could not make the smoke copy $dir (is ../shared/gpu's stack installed?)" >&2; exit 1; }
        touch "$dir.ready"
      fi
      own="K_${lane^^}"
      env $(lane_env $lane) CUDA_VISIBLE_DEVICES=$((gpu % ngpus)) NANO3_SYSTEM_PYTHON=1 NANO3_GPU_SMOKE_DIR=$dir PYTHONPATH=$(lane_path $lane) \
        PYTHONUNBUFFERED=1 setsid nohup python3 -m pytest -m gpu tests/gpu -v -s -k "${!own:-$K}" > /root/lane-$lane.log 2>&1 &
      echo $! > /root/lane-$lane.pid
      gpu=$((gpu + 1))
    done
    echo "started lanes ${LANES:-current older}" ;;
  status)
    for lane in current older; do
      if kill -0 "$(cat /root/lane-$lane.pid)" 2>/dev/null; then state=running; else state=finished; fi
      echo "== lane $lane: $state"
      grep -E "PASSED|FAILED|ERROR|passed|failed" /root/lane-$lane.log | tail -12
      [ "$state" = running ] && tail -3 /root/lane-$lane.log
    done ;;
  *) echo "usage: $0 start ['-k expression'] | status" >&2; exit 2 ;;
esac
