"""Checkpoint repair: a run whose last save was cut short resumes from its newest whole checkpoint.

Bridge writes a checkpoint's tensors, then points its trackers at it, then writes its run_config.yaml; a job stopped
in between (a time limit, a lost node) leaves a run every resume would die loading. The stage repairs it on node 0
before any rank starts (train.run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from nano3.files import atomic_copy
from nano3.train.rundir import (
    TRACKER,
    iteration_dir,
    iteration_dirs,
    iteration_of,
    latest_iteration,
    mark_latest,
)

# Bridge's files in a run directory beside Megatron's tracker (TRACKER), and in each checkpoint
BRIDGE_TRACKER = "latest_train_state.pt"
TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run_config.yaml"
# What Bridge reads from a checkpoint's run_config.yaml when it loads it (resume: the TP/PP check, RNG and optimizer
# state; export: the model section), and the sections every Bridge ConfigContainer writes
LOADED_KEYS = {"model": ("tensor_model_parallel_size", "pipeline_model_parallel_size"),
               "checkpoint": ("save_rng", "save_optim", "fully_parallel_save")}
SECTIONS = ("checkpoint", "dataset", "logger", "model", "optimizer", "scheduler", "tokenizer", "train")


def unfinished_save(checkpoint: Path) -> str | None:
    """Why Bridge could not load this checkpoint, or None. Bridge points its trackers at a new checkpoint before it
    writes the checkpoint's run_config.yaml (save_checkpoint's finalize, in every release from 0.2 to 0.6 and the
    recipe's nano-v3 branch), so a node lost in between leaves the trackers on a checkpoint whose config is missing
    or cut short, and every resume dies loading it (seen on an H200: a KeyError on `tensor_model_parallel_size`,
    the file cut at 16 of its 27 KB). SECTIONS are the ConfigContainer fields without a default in all of those."""
    config = checkpoint / RUN_CONFIG
    if not (checkpoint / TRAIN_STATE).is_file():
        return f"has no {TRAIN_STATE}"
    if not config.is_file():
        return f"has no {RUN_CONFIG}"
    try:
        written = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        return f"{RUN_CONFIG} is cut short (not valid YAML)"
    if not isinstance(written, dict):
        return f"{RUN_CONFIG} is empty"
    missing = [s for s in SECTIONS if not isinstance(written.get(s), dict)]
    missing += [f"{s}.{k}" for s, keys in LOADED_KEYS.items() if isinstance(written.get(s), dict)
                for k in keys if k not in written[s]]
    return f"{RUN_CONFIG} is cut short (no {', '.join(missing)})" if missing else None


def set_aside_unfinished_save(run_dir: Path, log) -> None:
    """A run whose last save was cut short resumes from its newest whole checkpoint (from the start, or lc's
    pretrained model, when there is none); the unfinished one is renamed, not deleted: its tensors were written
    whole (Bridge's barrier precedes the trackers), only its config is not. Idempotent: the rename comes first,
    and a tracker on a missing directory is handled the same way, so a stage killed midway redoes it.

    A save cut before its trackers (a SIGTERM to every process of a preempted job kills Bridge's checkpoint
    writer processes: seen on an H200, BrokenPipeError mid-save) leaves a directory past the tracked iteration,
    which the next save of that iteration would write into: it is set aside the same way."""
    done = latest_iteration(run_dir)
    for later in (d for d in iteration_dirs(run_dir) if iteration_of(d) > done):
        aside = run_dir / f"unfinished_{later.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(later, aside)
        log(f"warning: {later}: written after the last tracked checkpoint ({done}) and never finished (the stage "
            f"was stopped while Bridge saved it); kept as {aside.name} (remove it to free its space)")
    if not done:
        return
    checkpoint = iteration_dir(run_dir, done)
    reason = unfinished_save(checkpoint) if checkpoint.is_dir() else "is missing"
    if reason is None:
        return
    aside = run_dir / f"unfinished_{checkpoint.name}"
    if checkpoint.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
    whole = next((d for d in reversed(iteration_dirs(run_dir)) if unfinished_save(d) is None), None)
    if whole:
        back = iteration_of(whole)
        atomic_copy(whole / TRAIN_STATE, run_dir / BRIDGE_TRACKER)
        mark_latest(run_dir, back)
    else:
        back = 0
        for tracker in (BRIDGE_TRACKER, TRACKER):
            (run_dir / tracker).unlink(missing_ok=True)
    kept = f"; kept as {aside.name} (remove it to free its space)" if aside.exists() else ""
    log(f"warning: {checkpoint}: {reason}: the stage was stopped while Bridge saved it; resuming from "
        f"{f'iteration {back}' if back else 'the start'}{kept}")
