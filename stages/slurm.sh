# What every stages/<stage>.sbatch shares (sourced, never run). Settings come from the environment
# the job was submitted with (`python -m nano3.launch` sets them from stages/clusters.toml):
#   NANO3_RUNTIME   pyxis | apptainer | none      NANO3_IMAGE   container image (pyxis) or .sif file
#   NANO3_MOUNTS    src:dst[,src:dst...]          NANO3_MAX_REQUEUES   cap on self-requeues (default 20)
#   NANO3_PARAMS    parameter file (default params.yaml)
#   NANO3_IMAGE_EXTRAS   installed (the image has nano3's packages) | install (install them at job start)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
mkdir -p logs
export NANO3_PARAMS=${NANO3_PARAMS:-params.yaml} PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the package, where no .venv installed it (containers)
echo "nano3: job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}," \
     "runtime ${NANO3_RUNTIME:-none}, $(date -Is)"

# Run a command on every task of a job step, inside the container (exec: the caller's process is srun),
# after stages/in_image.sh has checked (or, with image_extras = "install", completed) the image.
in_container() {
  case "${NANO3_RUNTIME:-none}" in
    pyxis) exec srun --container-image="$NANO3_IMAGE" --container-workdir="$PWD" --no-container-mount-home \
             --container-mounts="$PWD:$PWD${NANO3_MOUNTS:+,$NANO3_MOUNTS}" bash stages/in_image.sh "$@" ;;
    apptainer) exec srun apptainer exec --nv --pwd "$PWD" --bind "$PWD${NANO3_MOUNTS:+,$NANO3_MOUNTS}" "$NANO3_IMAGE" \
                 bash stages/in_image.sh "$@" ;;
    none) exec srun bash stages/in_image.sh "$@" ;;
    *) echo "error: NANO3_RUNTIME='${NANO3_RUNTIME}' is not pyxis, apptainer or none" >&2; exit 2 ;;
  esac
}

# Multi-node rendezvous (node 0 of the allocation). The ranks' CUDA, NCCL and TE settings are the recipe's, set by
# the stage where it starts torchrun (nano3.train.environment); a value exported here or by the site wins.
training_env() {
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${MASTER_PORT:-29500}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# Send SIGTERM to the tasks of this job's steps (not the batch script): the stage then checkpoints.
signal_steps() {
  local steps
  steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i | grep -vE '\.(batch|extern)$' || true)
  [ -n "$steps" ] && scancel --signal=TERM $steps
}

# Run "$@" as the job's step. On the pre-time-limit signal (#SBATCH --signal=B:USR1@...), ask the
# step to checkpoint (SIGTERM), wait for it, and requeue the job if it stopped early (exit 3), up to
# NANO3_MAX_REQUEUES times. A step that fails is never requeued.
run_requeueable() {
  local step rc signalled=0
  trap 'signalled=1; echo "nano3: time limit near: asking the step to checkpoint"; signal_steps' USR1
  ("$@") & step=$!
  while true; do
    rc=0; wait "$step" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$step" 2>/dev/null; then continue; fi  # the trap interrupted wait
    break
  done
  trap - USR1
  if [ "$rc" = 3 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "${NANO3_MAX_REQUEUES:-20}" ]; then
      echo "nano3: stopped at a checkpoint (signal: $signalled); requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
      sleep 60  # Slurm ends this run of the script
      exit 0
    fi
    echo "nano3: not requeued: the job already restarted ${SLURM_RESTART_COUNT:-0} times (NANO3_MAX_REQUEUES)" >&2
    exit 1
  fi
  exit "$rc"
}
