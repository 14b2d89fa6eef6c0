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
# The job asks its training to checkpoint and stop by creating this file (nano3.train.stopping); not by signalling
# the step, which Slurm delivers to every process of it, DataLoader workers and torchrun included.
export NANO3_STOP_FILE="$PWD/logs/.stop-${SLURM_JOB_ID:-$$}"
rm -f "$NANO3_STOP_FILE"  # a requeued job keeps its id: an old request must not stop the new run
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the package, where no .venv installed it (containers)
STAGES=${NANO3_FROZEN:-$PWD}/stages  # the stage scripts the job runs
if [ -n "${NANO3_FROZEN:-}" ]; then  # the code, stage scripts and params as they were at submission (every restart)
  export PYTHONPATH="$NANO3_FROZEN/src:$PYTHONPATH"
  echo "nano3: code and params frozen at submission: $NANO3_FROZEN"
fi
echo "nano3: job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}," \
     "runtime ${NANO3_RUNTIME:-none}, $(date -Is)"

# Every step: the job's CPUs per task (Slurm >= 22.05 no longer hands a step the job's --cpus-per-task; prep starts
# that many workers), and one task that fails ends the others (no node left waiting for a rendezvous).
STEP_ARGS=(--kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK})

# Run a command on every task of a job step, inside the container (exec: the caller's process is srun),
# after stages/in_image.sh has checked (or, with image_extras = "install", completed) the image. pyxis: the container
# is named after the job, so the image is imported at its first step and reused by the others.
in_container() {
  case "${NANO3_RUNTIME:-none}" in
    pyxis) exec srun "${STEP_ARGS[@]}" --container-image="$NANO3_IMAGE" --container-name="nano3-${SLURM_JOB_ID:-$$}" \
             --container-workdir="$PWD" --no-container-mount-home \
             --container-mounts="$PWD:$PWD${NANO3_MOUNTS:+,$NANO3_MOUNTS}" bash "$STAGES/in_image.sh" "$@" ;;
    apptainer) exec srun "${STEP_ARGS[@]}" apptainer exec --nv --pwd "$PWD" --bind "$PWD${NANO3_MOUNTS:+,$NANO3_MOUNTS}" "$NANO3_IMAGE" \
                 bash "$STAGES/in_image.sh" "$@" ;;
    none) exec srun "${STEP_ARGS[@]}" bash "$STAGES/in_image.sh" "$@" ;;
    *) echo "error: NANO3_RUNTIME='${NANO3_RUNTIME}' is not pyxis, apptainer or none" >&2; exit 2 ;;
  esac
}

# Multi-node rendezvous (node 0 of the allocation). The ranks' CUDA, NCCL and TE settings are the recipe's, set by
# the stage where it starts torchrun (nano3.train.environment); a value exported here or by the site wins.
# The rendezvous is this job's first node, whatever MASTER_ADDR the submitting shell had (sbatch exports it);
# NANO3_MASTER_ADDR / NANO3_MASTER_PORT set them on purpose.
training_env() {
  export MASTER_ADDR=${NANO3_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${NANO3_MASTER_PORT:-29500}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}


# Run "$@" in the background and wait for it, through the signal traps that interrupt `wait`; its exit code in STEP_RC.
wait_for_step() {
  local step
  ("$@") & step=$!
  while true; do
    STEP_RC=0; wait "$step" || STEP_RC=$?
    if [ "$STEP_RC" -gt 128 ] && kill -0 "$step" 2>/dev/null; then continue; fi  # the trap interrupted wait
    break
  done
}

# Run "$@" as the job's step. On the pre-time-limit signal (#SBATCH --signal=B:USR1@...), ask the
# training to checkpoint (the stop file: each node's stage sends SIGTERM to its ranks alone), wait for it, and requeue the job if it stopped early (exit 3), up to
# NANO3_MAX_REQUEUES times. A step that fails is never requeued.
run_requeueable() {
  local rc signalled=0
  trap 'signalled=1; echo "nano3: time limit near: asking the training to checkpoint ($NANO3_STOP_FILE)";
        touch "$NANO3_STOP_FILE" || echo "nano3: could not write $NANO3_STOP_FILE" >&2' USR1
  wait_for_step "$@"; rc=$STEP_RC
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

# Data jobs (prep, its arrays and assembly, blend): on the pre-time-limit signal (#SBATCH --signal=B:USR1@...),
# requeue at once, up to NANO3_MAX_REQUEUES times; Slurm ends this run. The next start resumes prep from the
# units already written (their receipts); an assembly or a blend starts over. The chain's afterok jobs wait on.
run_restartable() {
  trap 'if [ "${SLURM_RESTART_COUNT:-0}" -lt "${NANO3_MAX_REQUEUES:-20}" ]; then
          echo "nano3: time limit near: requeueing job $SLURM_JOB_ID (finished units are kept)";
          scontrol requeue "$SLURM_JOB_ID" || echo "nano3: scontrol requeue failed" >&2;
        else echo "nano3: not requeued: the job already restarted ${SLURM_RESTART_COUNT:-0} times" >&2; fi' USR1
  wait_for_step "$@"
  exit "$STEP_RC"
}
