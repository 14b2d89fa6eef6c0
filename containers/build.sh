#!/usr/bin/env bash
# Build the nano3 image FROM the NeMo container with docker/podman, apptainer, or enroot (pyxis); see containers/README.md.
#   containers/build.sh [docker|podman|apptainer|enroot]     (default: the first one installed)
#   BASE=nvcr.io/nvidia/nemo:<tag> containers/build.sh ...   (another NeMo image; default: the recipe's)
# Outputs: image nano3:latest (docker/podman), containers/nano3.sif (apptainer), containers/nano3.sqsh (enroot:
# point a pyxis profile's container_image at it). Every build ends with containers/sanity.sh inside the image.
set -euo pipefail
cd "$(dirname "$0")/.."
tool=${1:-}
if [ -z "$tool" ]; then
  for t in docker podman apptainer singularity enroot; do command -v "$t" >/dev/null && { tool=$t; break; }; done
fi
[ -n "$tool" ] || { echo "error: none of docker, podman, apptainer, enroot is installed; see containers/README.md" >&2; exit 2; }
base=${BASE:-nvcr.io/nvidia/nemo:25.11.nemotron_3_nano}
case "$tool" in
  docker|podman) "$tool" build --build-arg BASE="$base" -t nano3:latest -f containers/Dockerfile . ;;
  apptainer|singularity)
    def=containers/apptainer.def
    if [ "$base" != nvcr.io/nvidia/nemo:25.11.nemotron_3_nano ]; then
      def=$(mktemp); sed "s|^From: .*|From: $base|" containers/apptainer.def > "$def"
    fi
    "$tool" build containers/nano3.sif "$def" ;;
  enroot)
    rm -f containers/nemo.sqsh containers/nano3.sqsh
    enroot import -o containers/nemo.sqsh "docker://${base/\//#}"
    enroot create -f -n nano3-build containers/nemo.sqsh
    enroot start --rw -m "$PWD:/opt/nano3-src" nano3-build bash -c \
      "mkdir -p /opt/nano3 && cp /opt/nano3-src/containers/requirements.txt /opt/nano3/ && \
       bash /opt/nano3-src/containers/install_extras.sh /opt/nano3/requirements.txt /opt/nano3/constraints.txt && \
       cd /opt/nano3-src && PYTHONPATH=src python -m nano3.extras --bake /opt/nano3/nemotron-h && \
       bash containers/sanity.sh"
    enroot export -o containers/nano3.sqsh nano3-build
    enroot remove -f nano3-build ;;
  *) echo "error: unknown container tool '$tool' (docker, podman, apptainer, enroot)" >&2; exit 2 ;;
esac
echo "built with $tool from $base"
