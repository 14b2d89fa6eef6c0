#!/bin/bash
# The recipe image's generation of the training stack, installed beside ../shared/gpu's current one on a GPU
# machine: Megatron-Bridge 0.3.1 + megatron-core 0.16.1, the oldest Bridge on the package registry with the
# Nemotron 3 Nano recipe (the image nemo:25.11.nemotron_3_nano has Bridge's nano-v3 branch, 0.3.0rc0, on
# megatron-core 0.16.0rc0; docs/stacks.md).
#
#   here, in the checkout root:   tests/gpu/older_stack.sh prepare          -> .dev-older/ (git-ignored, ~16 MiB)
#   on the GPU machine, after ../shared/gpu's install.sh, with .dev-older carried:
#                                 bash .dev-older/older_stack.sh install     -> /root/older-site
#   then run anything on the older stack with   PYTHONPATH=/root/older-site:$PWD/src
#
# --target keeps both stacks on one machine: PYTHONPATH picks one. Transformer Engine, mamba-ssm and torch stay
# the current stack's (TE 2.20.2, where Bridge 0.3.1 asks for < 2.13). The image's Python packages come from the
# stand-in of tests/standin/recipe_image.txt (transformers 4.57.6 without NemotronH, huggingface-hub 0.36, datasets
# 4.4; numpy, pyarrow and protobuf stay the machine's), so this stack is the recipe
# image's as far as a bare GPU machine allows. .dev-older/side holds containers/nemotron-h.txt's wheels: export and
# eval install their side folder from it (tests/gpu/both_stacks.sh sets PIP_FIND_LINKS for the lane).
set -euo pipefail
SITE=${OLDER_SITE:-/root/older-site}
case "${1:-}" in
  prepare)
    ROOT=$(git rev-parse --show-toplevel); OUT=$ROOT/.dev-older
    grep -qx '/.dev-older/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.dev-older/' >> "$ROOT/.git/info/exclude"
    rm -rf "$OUT" && mkdir -p "$OUT/base" "$OUT/standin" "$OUT/side"
    PLAT=""; for t in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 any; do PLAT="$PLAT --platform $t"; done
    get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$@"; }
    get "$OUT/base" megatron-bridge==0.3.1 megatron-core==0.16.1
    # not its protobuf 6.33: the machine's other packages (2026-12-03) need protobuf 7's API at import
    get "$OUT/standin" $(grep -iE '^(transformers|huggingface-hub|tokenizers|datasets|fsspec)==' \
                          "$ROOT/tests/standin/recipe_image.txt")
    get "$OUT/side" $(grep -vE '^[[:space:]]*(#|$)' "$ROOT/containers/nemotron-h.txt")
    cp "$0" "$OUT/older_stack.sh"
    echo "prepared $OUT ($(du -sh "$OUT" | cut -f1)); carry it and run: bash .dev-older/older_stack.sh install" ;;
  install)
    HERE=$(cd "$(dirname "$0")" && pwd)
    PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE"
    $PIP "$HERE"/base/*.whl
    # megatron-core's wheel lacks the Makefile Bridge runs at start-up (as in ../shared/gpu/install.sh)
    MK=$SITE/megatron/core/datasets/Makefile; [ -f "$MK" ] || printf 'all:\n\t@true\n' > "$MK"
    $PIP "$HERE"/standin/*.whl  # the recipe image's transformers, hub, tokenizers, datasets
    check='import warnings; warnings.filterwarnings("ignore")
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.recipes.nemotronh.nemotron_3_nano import nemotron_3_nano_pretrain_config
from megatron.bridge import AutoBridge
import megatron.bridge, megatron.core, transformers, huggingface_hub
print("older stack ready: megatron-bridge", megatron.bridge.__version__, "megatron-core", megatron.core.__version__,
      "transformers", transformers.__version__, "huggingface-hub", huggingface_hub.__version__)'
    PYTHONPATH=$SITE python3 -c "$check" ;;
  *) echo "usage: $0 prepare|install" >&2; exit 2 ;;
esac
