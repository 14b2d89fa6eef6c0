#!/bin/bash
# nano3's packages (a requirements file) installed into an image's Python without moving what the image has.
#   bash containers/install_extras.sh REQUIREMENTS CONSTRAINTS [pip install options...]
# Two modes, one place (Dockerfile, apptainer.def, build.sh and stages/in_image.sh all call it):
# - building an image (no --target): the installed torch, Megatron, Transformer Engine, mamba-ssm, causal-conv1d,
#   numpy and triton are written to CONSTRAINTS and pinned; the rest of REQUIREMENTS installs as pinned.
# - at job start on a bare image (--target DIR, profile image_extras = "install"): DIR goes first on PYTHONPATH,
#   so whatever it holds would shadow the image. CONSTRAINTS is then the image's whole `pip freeze`; pip's resolver,
#   run against the image as it is, names only what is missing (REQUIREMENTS' packages the image lacks, an exact pin
#   relaxed to the name, ranges kept, in versions compatible with every package the image has, and their missing
#   dependencies); exactly those are
#   installed into DIR, without dependencies, and DIR/INSTALLED.txt lists them. Nothing the image has is installed
#   again, so nothing can shadow it. A requirement no version of which fits the image stops with pip's reason.
# - a side folder (--side --target DIR; export and eval on an image whose transformers lacks NemotronH): every pin of
#   REQUIREMENTS, and whatever the resolver must add or upgrade for them, into DIR, which those stages put first on
#   PYTHONPATH; CONSTRAINTS pins only the image's torch, Megatron, TE, mamba-ssm, causal-conv1d, numpy and triton.
# pip runs as `$PYTHON -m pip` (default: python), never the `pip` on PATH, which may be another Python's (on a GPU
# machine seen 2026-12-03: /usr/local/bin/pip beside the stage's /opt/torch/.venv python).
set -euo pipefail
PY=${PYTHON:-python}
requirements=$1 constraints=$2
shift 2
target="" side=""
args=()
for arg in "$@"; do if [ "$arg" = --side ]; then side=1; else args+=("$arg"); fi; done
set -- "${args[@]}"
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = --target ]; then j=$((i + 1)); target=${!j}; fi
done
core() { "$PY" -m pip freeze | grep -iE '^(torch|megatron|transformer.engine|mamba.ssm|causal.conv1d|numpy|triton)' || true; }
if [ -z "$target" ]; then
  core > "$constraints"
  exec "$PY" -m pip install --no-cache-dir -c "$constraints" -r "$requirements" "$@"
fi

work=$(dirname "$constraints")
if [ -n "$side" ]; then
  core > "$constraints"
  grep -vE '^[[:space:]]*(#|$)' "$requirements" | sed 's/[[:space:]]*#.*//' > "$work/missing.in" || true
else
  "$PY" -m pip freeze --all | grep -E '^[A-Za-z0-9_.-]+==' > "$constraints" || true  # editable and URL installs cannot pin
  "$PY" - "$requirements" "$constraints" > "$work/missing.in" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, distribution

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = {canonical(line.split("==")[0]) for line in open(sys.argv[2]) if "==" in line}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
    try:
        distribution(name)
        continue  # the image has it: its version is used
    except PackageNotFoundError:
        pass
    if canonical(name) not in have:  # an exact pin becomes the name: pip picks a version that fits the image
        print(name if re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^,;]+", line) else line)
EOF
fi
if [ ! -s "$work/missing.in" ]; then
  echo "nano3: the image has every package of $requirements"
  mkdir -p "$target"; : > "$target/INSTALLED.txt"; exit 0
fi
"$PY" -m pip install --dry-run --no-cache-dir --report "$work/report.json" \
  -c "$constraints" -r "$work/missing.in" > "$work/resolve.log" 2>&1 || {
  why=$(grep -m2 -E ' depends on |requested|No matching distribution' "$work/resolve.log" | sed 's/^ *//' | paste -sd ';' -)
  echo "error: $requirements: no version of $(paste -sd ' ' "$work/missing.in") fits this image's packages (${why:-see $work/resolve.log}); use an image that has it, or build one with make container" >&2
  exit 2
}
"$PY" - "$work/report.json" > "$work/missing.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
EOF
"$PY" -m pip install --no-cache-dir --no-deps -r "$work/missing.txt" "$@"
cp "$work/missing.txt" "$target/INSTALLED.txt"
echo "nano3: installed $(wc -l < "$work/missing.txt") packages the image lacks into $target (INSTALLED.txt)"
