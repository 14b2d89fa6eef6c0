"""One spec per phase: every Megatron-Bridge field a training phase gets, built once, by the stage.

The stage (train.run) builds each phase's spec from params.yaml and the `bridge.*` fields of its command line and
writes it into the run directory, `spec.<phase>.json`, before any rank starts. The ranks (train.entry) apply that
file and never read params.yaml; `make plan BRIDGE=1` prints the same fields; the read-back (train.conform)
compares the live objects with the same file. A spec holds:

    source     the params file it was built from
    phase      the phase's place in the schedule (nano3.schedule.PhasePlan's fields)
    bridge     the dotted Bridge fields params.yaml gives, as train.mapping spells them
    bridge_cli the `bridge.*` fields of the stage's command line, which the ranks set last; the read-back checks
               the run against `bridge` (params.yaml), so one that contradicts params.yaml stops the run
    derived    what the read-back checks that is no Bridge field: DP and world size, the padded vocabulary, the
               blend's shares, the samples the phase reads, the backend and the ranks' environment
    metrics    what the ranks' metrics callback needs (tokens per iteration, FLOPs per token)
    mix        lc.mix's short sequences, or null
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nano3.config.sections import phase_section
from nano3.files import atomic_write_json, read_json
from nano3.schedule import PhasePlan, build_schedule

FILE = "spec.{phase}.json"


def spec_path(run_dir: str | Path, phase: str) -> Path:
    return Path(run_dir) / FILE.format(phase=phase)


def build(params, phase: PhasePlan, run_dir: str | Path, backend: str, pretrained: str | None = None,
          bridge_cli: dict[str, Any] | None = None) -> dict:
    """The spec of one phase, from params as `backend` runs them (backends.for_backend)."""
    from nano3.data.megatron import prefixes_and_weights
    from nano3.data.tokenizers import read_info
    from nano3.model.flops import mixed_flops_per_token, padded_vocab
    from nano3.model.presets import model_preset
    from nano3.model.vocab import model_vocab
    from nano3.train.effective import blend_shares
    from nano3.train.environment import training_environment
    from nano3.train.mapping import bridge_overrides
    from nano3.train.plan import read_layout

    cfg = params.settings
    layout = read_layout(params, phase_section(phase.name))
    preset = model_preset(cfg.model)
    bridge = bridge_overrides(params, build_schedule(cfg), phase, str(run_dir), pretrained)
    blend = read_json(Path(cfg.blend.out_dir) / f"{phase.blend}.json", f"{phase.blend} blend")
    vocab = padded_vocab(model_vocab(params), preset, layout.tp)
    mix = cfg.lc.mix if phase.name == "lc" and cfg.lc.mix.short_share else None
    derived = {
        "backend": backend, "dp": layout.dp, "world": layout.world,
        "vocab": {"tokenizer": read_info(cfg.tokenizer.dir).vocab_size, "model": vocab},
        "blend": blend_shares([prefixes_and_weights(blend.get(split)) for split in ("train", "valid")]),
        "train_samples": phase.samples, "sample_offset": phase.sample_offset,
    }
    if backend == "megatron":  # the CPU reference starts no ranks
        derived["environment"] = {str(k): str(v) for k, v in (cfg.train.env or {}).items()}
        derived["environment_recorded"] = sorted(training_environment(params, layout.tp, {}))
    return {
        "source": str(params.source),
        "phase": dataclasses.asdict(phase),
        "bridge": bridge,
        "bridge_cli": dict(bridge_cli or {}),
        "derived": derived,
        "metrics": {"tokens_per_iter": phase.global_batch_size * phase.seq_length, "log_interval": cfg.train.log_interval,
                    "flops_true": mixed_flops_per_token(preset, phase.seq_length, vocab, "true", mix),
                    "flops_bridge": mixed_flops_per_token(preset, phase.seq_length, vocab, "bridge", mix)},
        "mix": None if mix is None else {"short_share": mix.short_share, "short_length": mix.short_length},
    }


def write(run_dir: str | Path, spec: dict) -> Path:
    path = spec_path(run_dir, spec["phase"]["name"])
    atomic_write_json(path, spec)
    return path


def read(path: str | Path) -> dict:
    return read_json(Path(path), "phase spec (the training stage writes it before the ranks start)")


def bridge_fields(spec: dict) -> dict[str, Any]:
    """What the ranks set on Bridge's recipe config: params.yaml's fields, then the command line's."""
    return {**spec["bridge"], **spec["bridge_cli"]}


def phase_of(spec: dict) -> PhasePlan:
    return PhasePlan(**spec["phase"])
