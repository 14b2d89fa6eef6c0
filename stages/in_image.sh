#!/bin/bash
# Runs inside the job's container, before the stage (slurm.sh's in_container calls it on every task):
#   bash stages/in_image.sh CMD...
# 1. With the profile's `image_extras = "install"` (a bare NeMo image), nano3's packages are installed once per
#    requirements file into .nano3-extras/ of the submit directory (pinned to the image's torch and Megatron)
#    and put on PYTHONPATH. Each task installs into a private folder and renames it into place: concurrent
#    tasks on shared storage never see half an install.
# 2. `python -m nano3.launch.image` stops the job in one line if the image still lacks a package.
set -euo pipefail
if [ "${NANO3_IMAGE_EXTRAS:-installed}" = install ]; then
  tag=$(python -c 'import sys; print("py%d%d" % sys.version_info[:2])')-$(sha256sum containers/requirements.txt | cut -c1-12)
  dir=$PWD/.nano3-extras/$tag
  if [ ! -f "$dir/.complete" ]; then
    work=$dir.tmp.${SLURM_NODEID:-0}.${SLURM_PROCID:-0}.$$
    mkdir -p "$work"
    echo "nano3: installing containers/requirements.txt into $dir (image_extras = install)"
    bash containers/install_extras.sh containers/requirements.txt "$work/constraints.txt" --quiet --target "$work"
    touch "$work/.complete"
    mv -T "$work" "$dir" 2>/dev/null || rm -rf "$work"  # another task won the rename: use its install
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$dir"
fi
python -m nano3.launch.image
exec "$@"
