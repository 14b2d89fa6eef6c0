#!/bin/bash
# Runs inside the job's container, before the stage (slurm.sh's in_container calls it on every task):
#   bash stages/in_image.sh CMD...
# 1. With the profile's `image_extras = "install"` (a bare NeMo image), nano3's packages are installed once per image
#    and requirements file into .nano3-extras/ of the submit directory (only what the image lacks, in versions that
#    fit it: nano3.extras) and put on PYTHONPATH. export and eval add a side folder of their own where the
#    image's transformers lacks NemotronH (nano3.extras.ensure_nemotron_h).
# 2. `python -m nano3.launch.image` stops the job in one line if the image still lacks a package.
set -euo pipefail
if [ "${NANO3_IMAGE_EXTRAS:-installed}" = install ]; then
  dir=$(python -m nano3.extras "${NANO3_FROZEN:-$PWD}/containers/requirements.txt")
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$dir"
fi
python -m nano3.launch.image
exec "$@"
