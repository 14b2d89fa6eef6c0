"""GPU entry point for one training phase, run by torchrun on every rank:

    torchrun --nproc_per_node=N -m nano3.train.entry --spec DIR/spec.phase1.json --run-dir DIR --live-dir LIVE

Builds Megatron-Bridge's Nemotron 3 Nano recipe config, sets the Bridge fields of the phase's spec (train.spec,
which the stage wrote from params.yaml: the ranks never read it), and runs Bridge's `pretrain` (through
megatron_compat, so the recipe image's older Bridge runs it too).
Megatron-Bridge and Transformer Engine are imported only here.
Import-safe on purpose: distributed checkpoint saving starts worker processes with spawn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import nano3  # noqa: F401  (quiet imports)
from nano3.errors import UserError
from nano3.files import atomic_write_json
from nano3.megatron_compat import (
    adapt_overrides,
    dataset_providers,
    graph_modules,
    installed_stack,
    require_packed_mamba,
    run_pretrain,
)
from nano3.train.rundir import failure_path


def set_field(cfg, dotted: str, value: Any) -> None:
    """Set one dotted ConfigContainer field; an unknown field is an error, not a silent no-op."""
    *path, name = dotted.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    if not hasattr(node, name):
        raise UserError(f"Megatron-Bridge config has no field '{dotted}'; check the override's spelling")
    setattr(node, name, value)


class PhaseWindow:
    """A phase's training dataset seen at Megatron's sample numbers: a phase that resumes at consumed sample
    `offset` (phase 2) reads indices offset.. of a dataset built only for the samples it reads."""

    def __init__(self, dataset, offset: int):
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return self.offset + len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index - self.offset]


def read_only_the_phase(phase, requested: dict, mix=None) -> None:
    """Make Bridge build each phase's training index for the samples that phase reads (phase 2 of the recipe:
    366M, not the 6.1B of train_iters x GBS that Bridge would request) and record what was requested.

    Bridge picks the dataset provider from its registry by config type at pretrain() time; the wrapper keeps
    its two-argument signature so Bridge binds no extra arguments. With `mix` (lc.mix as the spec records it) its
    share of training samples comes as packed short sequences (data/lc_mix.py).
    """
    from megatron.bridge.training.config import GPTDatasetConfig

    from nano3.data.lc_mix import ShortSequenceMix

    registry = dataset_providers(GPTDatasetConfig)
    original = registry[GPTDatasetConfig]

    def provider(train_val_test_num_samples, dataset_config):
        sizes = [phase.samples, *train_val_test_num_samples[1:]]
        requested.update(train_samples=sizes[0], valid_samples=int(sizes[1]), sample_offset=phase.sample_offset,
                         # read back from the config megatron-core's datasets get (a seq x seq mask per sample if on)
                         create_attention_mask=bool(getattr(dataset_config, "create_attention_mask", True)))
        train, valid, test = original(sizes, dataset_config)
        if train is not None:
            train = PhaseWindow(train, phase.sample_offset)
            if mix is not None:
                train = ShortSequenceMix(train, mix["short_share"], mix["short_length"])
        return train, valid, test

    registry[GPTDatasetConfig] = provider


def record_packed_batches(path: Path) -> None:
    """Read back what runs (lc.mix): every packed micro-batch Bridge's forward step builds on this rank is counted
    in `path`, with its number of sequences and whether megatron-core derived the Mamba state resets (seq_idx)."""
    import importlib

    gpt_step = importlib.import_module("megatron.bridge.training.gpt_step")
    build = getattr(gpt_step, "get_packed_seq_params", None)
    if build is None:
        print(f"warning: this Bridge's forward step has no get_packed_seq_params; {path.name} is not recorded")
        return
    seen = {"micro_batches": 0}

    def counting(batch):
        packed = build(batch)
        seen.update(micro_batches=seen["micro_batches"] + 1, sequences=int(packed.cu_seqlens_q.numel() - 1),
                    max_seqlen=int(packed.max_seqlen_q), mamba_seq_idx=packed.seq_idx is not None)
        atomic_write_json(path, seen)
        return packed

    gpt_step.get_packed_seq_params = counting


def build_config(overrides: dict[str, Any]) -> tuple[Any, list[str]]:
    """Bridge's recipe config with our overrides, spelled for the installed Bridge (megatron_compat);
    returns the config and the notes of what was spelled differently."""
    from megatron.bridge.recipes.nemotronh.nemotron_3_nano import nemotron_3_nano_pretrain_config
    from megatron.bridge.recipes.utils.dataset_utils import get_blend_fields_from_data_paths
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    cfg = nemotron_3_nano_pretrain_config()
    overrides, notes = adapt_overrides(cfg, overrides)
    for key, value in overrides.items():
        if key == "dataset.per_split_data_args_path":
            blend, per_split, split = get_blend_fields_from_data_paths(per_split_data_args_path=value)
            cfg.dataset.blend, cfg.dataset.blend_per_split, cfg.dataset.split = blend, per_split, split
        elif key == "mixed_precision":
            mp = get_mixed_precision_config(value)
            mp.grad_reduce_in_fp32 = False  # as the recipe: bf16 gradient reduction
            cfg.mixed_precision = mp
        elif key == "comm_overlap":
            cfg.comm_overlap = value
        elif key in ("model.cuda_graph_modules", "model.cuda_graph_scope") and value:
            set_field(cfg, key, graph_modules(value))
        else:
            set_field(cfg, key, value)
    return cfg, notes


def main(argv: list[str] | None = None) -> None:
    from megatron.bridge.training.gpt_step import forward_step

    from nano3.train import spec as phase_spec
    from nano3.train.conform import EffectiveConfigCallback
    from nano3.train.metrics import DvcliveCallback

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="the phase's spec.<phase>.json (train.spec), which the stage wrote")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--live-dir", required=True)
    args = ap.parse_args(argv)

    spec = phase_spec.read(args.spec)
    phase = phase_spec.phase_of(spec)
    cfg, spelled = build_config(phase_spec.bridge_fields(spec))
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(Path(args.run_dir) / f"stack.{phase.name}.json",
                          {"installed": installed_stack(), "spelled_for_this_bridge": spelled})

    metrics = spec["metrics"]
    callback = DvcliveCallback(
        live_dir=args.live_dir, stage_label=phase.name, tokens_per_iter=metrics["tokens_per_iter"],
        flops_true=metrics["flops_true"], flops_bridge=metrics["flops_bridge"], log_interval=metrics["log_interval"],
        extra={"run": Path(args.run_dir).name, "phase": phase.name}, last_iter=phase.end_iter,
    )
    mix = spec["mix"]
    requested: dict = {}
    read_only_the_phase(phase, requested, mix)
    conformance = EffectiveConfigCallback(spec, args.run_dir, requested)
    try:
        if mix is not None:
            require_packed_mamba()
            if int(os.environ.get("RANK", "0")) == 0:
                record_packed_batches(Path(args.run_dir) / f"packed.{phase.name}.json")
        run_pretrain(cfg, forward_step, [conformance, callback])
    except UserError as e:  # every rank raises it; rank 0 hands the one line to the stage (run.py)
        if int(os.environ.get("RANK", "0")) == 0:
            failure_path(args.run_dir, phase.name).write_text(f"{e}\n")
            print(f"error: {e}", flush=True)
        raise SystemExit(2)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
