"""params.yaml -> Megatron-Bridge overrides: the one mapping layer between our knobs and Bridge's.

Training starts from Bridge's own recipe, `nemotron_3_nano_pretrain_config()`, and sets the dotted
ConfigContainer fields returned here on top of it (entry.py). This module is pure Python so the
mapping is tested on any machine; every key it emits is checked against the config classes Bridge
builds on (tests/unit/test_mapping.py).

Order of precedence: Bridge recipe < this mapping < `train.bridge_overrides` in params.yaml
(tracked by DVC) < Bridge-style `section.field=value` arguments on the command line (ad hoc runs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nano3.blend.validate import bridge_tokenizer_fields
from nano3.data.tokenizer import read_info
from nano3.errors import UserError
from nano3.train.plan import model_vocab, read_layout
from nano3.train.presets import bridge_model_extras, model_preset
from nano3.train.schedule import PhasePlan, TrainingSchedule

# Bridge ConfigContainer sections a command-line override may address directly.
BRIDGE_SECTIONS = ("model", "train", "validation", "optimizer", "scheduler", "dataset", "checkpoint", "logger",
                   "ddp", "rng", "mixed_precision", "comm_overlap", "dist", "profiling", "tokenizer")

PRECISIONS = {"bf16": "bf16_mixed", "fp8": "bf16_with_fp8_current_scaling_mixed", "mxfp8": "bf16_with_mxfp8_mixed"}

# train.* keys that do not change what is learned: a changed value resumes the same run.
OPERATIONAL_KEYS = {"keep_checkpoints", "nodes", "gpus_per_node", "parallel", "micro_batch_size", "log_interval", "save_interval", "live_dir",
                    "eval_interval", "eval_iters", "measured_tflops_per_gpu", "kernels", "recompute_modules",
                    "precision", "bridge_overrides", "backend", "num_workers"}


def run_digest(params, stage: str, upstream: dict[str, str]) -> str:
    """Identity of a training run: what it learns from. Checkpoints live under it, so a kill resumes
    the same run while `dvc exp run -S train.lr=...` starts a new one."""
    section = "train" if stage == "pretrain" else "lc"
    learned = {k: v for k, v in params.get_key(section, kind=dict).items() if k not in OPERATIONAL_KEYS}
    doc = {"stage": stage, "model": params.get_key("model"), section: learned, "upstream": upstream}
    if stage == "lc":
        doc["train_seed"] = params.get_key("train.seed")
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing; run the stage that writes it (make blend / make pretrain)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _kernels(params) -> dict[str, Any]:
    k = params.get_key("train.kernels", {}, kind=dict) or {}
    out = {
        # The recipe's `flex` dispatcher needs HybridEP (NeMo container); alltoall works everywhere.
        "model.moe_token_dispatcher_type": k.get("moe_dispatcher", "alltoall"),
        "model.cuda_graph_impl": k.get("cuda_graphs", "none"),
        "model.gradient_accumulation_fusion": bool(k.get("grad_accum_fusion", False)),  # needs APEX
        "model.use_mamba_mem_eff_path": bool(k.get("fused_mamba", True)),  # needs causal-conv1d
        "model.moe_permute_fusion": bool(k.get("moe_permute_fusion", True)),
        "model.moe_grouped_gemm": True,
    }
    if out["model.moe_token_dispatcher_type"] == "flex":
        out["model.moe_flex_dispatcher_backend"] = k.get("flex_backend", "hybridep")
    if out["model.cuda_graph_impl"] == "none":
        out["model.cuda_graph_modules"] = []
    return out


def bridge_overrides(params, schedule: TrainingSchedule, phase: PhasePlan, run_dir: str,
                     pretrained: str | None = None) -> dict[str, Any]:
    """Every Bridge field this repository sets for one training phase (pretrain phase1/phase2, or lc)."""
    g = params.get_key
    section = "lc" if phase.name == "lc" else "train"
    layout = read_layout(params, section)
    preset = model_preset(params)
    lr = schedule.lc_lr if phase.name == "lc" else schedule.pretrain_lr
    tok_dir = g("tokenizer.dir", kind=str)
    recompute = g("train.recompute_modules", [], kind=list) or []
    o: dict[str, Any] = {f"model.{k}": v for k, v in preset.bridge_fields().items()}
    o.update({f"model.{k}": v for k, v in bridge_model_extras(params).items()})
    if g("model.vocab_size", None) is not None:
        o["model.vocab_size"] = model_vocab(params)  # checked against the tokenizer
    o.update({
        "model.seq_length": phase.seq_length,
        "model.tensor_model_parallel_size": layout.tp,
        "model.pipeline_model_parallel_size": layout.pp,
        "model.context_parallel_size": layout.cp,
        "model.expert_model_parallel_size": layout.ep,
        "model.expert_tensor_parallel_size": layout.etp,
        "model.sequence_parallel": layout.sequence_parallel,
        "model.recompute_granularity": "selective" if recompute else None,
        "model.recompute_modules": list(recompute) or None,
        **_kernels(params),
        "train.train_iters": phase.train_iters,
        "train.exit_interval": phase.exit_interval,
        "train.global_batch_size": phase.global_batch_size,
        "train.micro_batch_size": layout.micro_batch_size,
        "train.exit_signal_handler": True,  # SIGTERM (Slurm's pre-time-limit signal): save, then exit
        "validation.eval_interval": g("train.eval_interval", kind=int),
        "validation.eval_iters": g("train.eval_iters", kind=int),
        "optimizer.lr": lr.lr,
        "optimizer.min_lr": lr.min_lr,
        "optimizer.weight_decay": float(g("train.weight_decay")),
        "optimizer.adam_beta1": float(g("train.adam_beta1")),
        "optimizer.adam_beta2": float(g("train.adam_beta2")),
        "optimizer.adam_eps": float(g("train.adam_eps")),
        "optimizer.clip_grad": float(g("train.clip_grad")),
        # megatron-core's OptimizerParamScheduler rewrites every group's weight decay at every step from
        # these, not from optimizer.weight_decay; Bridge's recipe helper leaves them at 0.033.
        "scheduler.start_weight_decay": float(g("train.weight_decay")),
        "scheduler.end_weight_decay": float(g("train.weight_decay")),
        "scheduler.weight_decay_incr_style": "constant",
        "scheduler.lr_warmup_iters": lr.warmup_iters,
        "scheduler.lr_warmup_init": lr.warmup_init,
        "scheduler.lr_decay_iters": lr.decay_iters,
        "scheduler.lr_decay_style": lr.style,
        "scheduler.lr_wsd_decay_style": lr.wsd_decay_style,
        "scheduler.lr_wsd_decay_iters": lr.decay_iters - lr.decay_start_iter if lr.style == "WSD" else None,
        "dataset.seq_length": phase.seq_length,
        "dataset.random_seed": g("train.seed", kind=int),
        "dataset.per_split_data_args_path": str(Path(g("blend.out_dir", kind=str)) / f"{phase.blend}.json"),
        "dataset.path_to_cache": str(Path(g("blend.out_dir", kind=str)) / "cache"),
        "dataset.num_workers": int(g("train.num_workers", 2)),
        "dataset.mmap_bin_files": True,
        **{f"tokenizer.{k}": v for k, v in bridge_tokenizer_fields(tok_dir, read_info(tok_dir)).items()},
        "tokenizer.use_tokenizer_vocab_size": g("model.vocab_size", None) is None,
        "checkpoint.save": run_dir,
        "checkpoint.load": run_dir,
        "checkpoint.save_interval": g("train.save_interval", kind=int),
        "checkpoint.most_recent_k": keep_checkpoints(params),
        "checkpoint.pretrained_checkpoint": pretrained,
        "checkpoint.ckpt_format": "torch_dist",
        "checkpoint.async_save": False,
        "logger.log_interval": g("train.log_interval", kind=int),
        "logger.tensorboard_dir": str(Path(run_dir) / "tensorboard"),
        "rng.seed": g("train.seed", kind=int),
        "mixed_precision": PRECISIONS[_precision(params)],
    })
    if layout.tp == 1:
        o["comm_overlap"] = None  # the recipe's TP communication overlap needs TP > 1
    wandb = g("wandb", {}, kind=dict) or {}
    if wandb.get("enabled"):
        o.update({"logger.wandb_project": wandb.get("project", "nano3"), "logger.wandb_entity": wandb.get("entity"),
                  "logger.wandb_exp_name": f"{phase.name}-{Path(run_dir).name}"})
    extra = g("train.bridge_overrides", {}, kind=dict) or {}
    owned = sorted(set(extra) & set(STAGE_OWNED))
    if owned:
        raise UserError(f"{params.source}: train.bridge_overrides.{owned[0]}: {STAGE_OWNED[owned[0]]}")
    o.update(extra)
    return o


# Bridge fields the stage itself must own: setting them behind its back breaks resume or the curriculum.
STAGE_OWNED = {
    "checkpoint.save": "checkpoints go to train.checkpoint_dir/<stage>/<run digest>; set train.checkpoint_dir",
    "checkpoint.load": "the stage resumes from its own run directory; set train.checkpoint_dir",
    "train.train_iters": "set by the token budget; set train.tokens (or lc.tokens)",
    "dataset.per_split_data_args_path": "the blend stage writes the phase blends; change blend.phases",
}


def keep_checkpoints(params) -> int:
    """`train.keep_checkpoints` as Bridge's most_recent_k: null keeps every checkpoint (-1)."""
    keep = params.get_key("train.keep_checkpoints", None, kind=int)
    if keep is not None and keep < 1:
        raise UserError(f"{params.source}: train.keep_checkpoints={keep} must be >= 1 (or null to keep all)")
    return -1 if keep is None else keep


def _precision(params) -> str:
    value = params.get_key("train.precision", "bf16", kind=str)
    if value not in PRECISIONS:
        raise UserError(f"{params.source}: train.precision={value!r} must be one of {sorted(PRECISIONS)}")
    return value


def split_cli_overrides(params, overrides: list[str]) -> tuple[list[str], list[str]]:
    """Separate params.yaml overrides from Bridge-style ones (`section.field=value` not in params.yaml).

    `train.train_iters=N`, the recipe document's example, is read as a token budget of
    N x global_batch_size x seq_length, so the phase switch and the schedule follow it;
    `checkpoint.save=/path`, its other example, sets the checkpoint root (train.checkpoint_dir), where
    the stage also looks for the checkpoint to resume from.
    """
    ours, bridge = [], []
    for text in overrides:
        key, _, value = text.partition("=")
        if key == "checkpoint.save":
            ours.append(f"train.checkpoint_dir={value}")
        elif key in STAGE_OWNED and key != "train.train_iters":
            raise UserError(f"override '{text}': {STAGE_OWNED[key]}")
        elif key == "train.train_iters":
            ours.append(f"train.tokens={int(value) * int(params.get_key('train.global_batch_size'))
                                      * int(params.get_key('train.seq_length'))}")
        elif params.has_key(key) or key.split(".")[0] not in BRIDGE_SECTIONS:
            ours.append(text)
        else:
            bridge.append(text)
    return ours, bridge
