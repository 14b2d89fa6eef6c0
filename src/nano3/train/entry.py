"""GPU entry point for one training phase, run by torchrun on every rank:

    torchrun --nproc_per_node=N -m nano3.train.entry --stage pretrain --phase phase1 --run-dir DIR [...]

Builds Megatron-Bridge's Nemotron 3 Nano recipe config, applies mapping.bridge_overrides, and
runs Bridge's `pretrain` (through megatron_compat, so the recipe image's older Bridge runs it too).
Megatron-Bridge and Transformer Engine are imported only here.
Import-safe on purpose: distributed checkpoint saving starts worker processes with spawn.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import nano3  # noqa: F401  (quiet imports)
from nano3.config import load_params, parse_override
from nano3.config.sections import phase_section
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
    its two-argument signature so Bridge binds no extra arguments. With `mix` (lc.mix) its share of training
    samples comes as packed short sequences (data/lc_mix.py).
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
                train = ShortSequenceMix(train, mix.short_share, mix.short_length)
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

    from nano3.model.flops import mixed_flops_per_token, padded_vocab
    from nano3.model.presets import model_preset
    from nano3.schedule import build_schedule
    from nano3.train.conform import EffectiveConfigCallback
    from nano3.train.mapping import bridge_overrides
    from nano3.train.metrics import DvcliveCallback
    from nano3.train.plan import model_vocab, read_layout

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", required=True)
    ap.add_argument("--phase", required=True, choices=["phase1", "phase2", "lc"])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--live-dir", required=True)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--override", action="append", default=[], help="params.yaml override")
    ap.add_argument("--bridge", action="append", default=[], help="Bridge section.field=value override")
    args = ap.parse_args(argv)

    params = load_params(args.params, args.override)
    schedule = build_schedule(params.settings)
    phase = schedule.phase(args.phase)
    overrides = bridge_overrides(params, schedule, phase, args.run_dir, args.pretrained)
    overrides.update(dict(parse_override(text) for text in args.bridge))
    cfg, spelled = build_config(overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.run_dir) / f"bridge_overrides.{args.phase}.json").write_text(
            json.dumps(overrides, indent=2, sort_keys=True, default=str))
        atomic_write_json(Path(args.run_dir) / f"stack.{args.phase}.json",
                          {"installed": installed_stack(), "spelled_for_this_bridge": spelled})

    preset = model_preset(params.settings.model)
    layout = read_layout(params, phase_section(args.phase))
    vocab = padded_vocab(model_vocab(params), preset, layout.tp)
    mix = params.settings.lc.mix if args.phase == "lc" and params.settings.lc.mix.short_share else None
    callback = DvcliveCallback(
        live_dir=args.live_dir, stage_label=args.phase, tokens_per_iter=phase.global_batch_size * phase.seq_length,
        flops_true=mixed_flops_per_token(preset, phase.seq_length, vocab, "true", mix),
        flops_bridge=mixed_flops_per_token(preset, phase.seq_length, vocab, "bridge", mix),
        log_interval=params.settings.train.log_interval,
        extra={"run": Path(args.run_dir).name, "phase": args.phase}, last_iter=phase.end_iter,
    )
    requested: dict = {}
    read_only_the_phase(phase, requested, mix)
    conformance = EffectiveConfigCallback(params, phase, args.run_dir, requested)
    try:
        if mix is not None:
            require_packed_mamba()
            if int(os.environ.get("RANK", "0")) == 0:
                record_packed_batches(Path(args.run_dir) / f"packed.{args.phase}.json")
        run_pretrain(cfg, forward_step, [conformance, callback])
    except UserError as e:  # every rank raises it; rank 0 hands the one line to the stage (run.py)
        if int(os.environ.get("RANK", "0")) == 0:
            failure_path(args.run_dir, args.phase).write_text(f"{e}\n")
            print(f"error: {e}", flush=True)
        raise SystemExit(2)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
