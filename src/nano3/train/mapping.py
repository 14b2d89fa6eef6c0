"""params.yaml -> Megatron-Bridge overrides: the one mapping layer between our knobs and Bridge's.

Training starts from Bridge's own recipe, `nemotron_3_nano_pretrain_config()`, and sets the dotted
ConfigContainer fields returned here on top of it (entry.py). This module is pure Python so the
mapping is tested on any machine; every key it emits is checked against the config classes Bridge
builds on (tests/unit/test_training_plan.py, test_mapping_emits_only_fields_bridge_has).

Order of precedence: Bridge recipe < this mapping < `train.bridge_overrides` in params.yaml
(tracked by DVC) < `bridge.<section>.<field>=value` arguments on the command line (ad hoc runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nano3.config.overrides import STAGE_OWNED
from nano3.config.sections import Kernels, TokenizerConfig, TrainConfig, phase_section
from nano3.data.megatron import bridge_tokenizer_fields
from nano3.data.tokenizers import INFO_FILE, read_info
from nano3.errors import UserError
from nano3.model.presets import bridge_model_extras, model_preset
from nano3.schedule import PhasePlan, TrainingSchedule
from nano3.train.plan import CROSS_ENTROPY, model_vocab, read_layout

PRECISIONS = {"bf16": "bf16_mixed", "fp8": "bf16_with_fp8_current_scaling_mixed",
              "fp8_delayed": "bf16_with_fp8_delayed_scaling_mixed", "fp8_blockwise": "bf16_with_fp8_subchannel_scaling_mixed",
              "mxfp8": "bf16_with_mxfp8_mixed"}

def _kernels(k: Kernels) -> dict[str, Any]:
    out = {
        # The recipe's `flex` dispatcher needs HybridEP (NeMo container); alltoall works everywhere.
        "model.moe_token_dispatcher_type": k.moe_dispatcher,
        "model.cuda_graph_impl": k.cuda_graphs,
        "model.gradient_accumulation_fusion": k.grad_accum_fusion,  # needs APEX
        "model.use_mamba_mem_eff_path": k.fused_mamba,  # needs causal-conv1d
        "model.moe_permute_fusion": k.moe_permute_fusion,
        "model.moe_grouped_gemm": True,
    }
    if out["model.moe_token_dispatcher_type"] == "flex":
        out["model.moe_flex_dispatcher_backend"] = k.flex_backend
    if out["model.cuda_graph_impl"] == "none":
        out["model.cuda_graph_modules"] = []
    else:  # captured graphs replay TE's RNG states (Bridge's benchmarks set both whenever graphs run)
        out["model.use_te_rng_tracker"] = out["rng.te_rng_tracker"] = True
    return out


def bridge_overrides(params, schedule: TrainingSchedule, phase: PhasePlan, run_dir: str,
                     pretrained: str | None = None) -> dict[str, Any]:
    """Every Bridge field this repository sets for one training phase (pretrain phase1/phase2, or lc)."""
    cfg = params.settings
    section = phase_section(phase.name)
    layout = read_layout(params, section)
    preset = model_preset(params.settings.model)
    lr = schedule.lc_lr if phase.name == "lc" else schedule.pretrain_lr
    tok_dir = cfg.tokenizer.dir
    recompute = cfg.train.recompute_modules or []
    o: dict[str, Any] = {f"model.{k}": v for k, v in preset.bridge_fields().items()}
    o.update({f"model.{k}": v for k, v in bridge_model_extras(params.settings.model).items()})
    if cfg.model.vocab_size is not None:
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
        **_kernels(cfg.train.kernels),
        "train.train_iters": phase.train_iters,
        "train.exit_interval": phase.exit_interval,
        "train.global_batch_size": phase.global_batch_size,
        "train.micro_batch_size": layout.micro_batch_size,
        "train.exit_signal_handler": True,  # SIGTERM (Slurm's pre-time-limit signal): save, then exit
        "train.exit_signal_handler_for_dataloader": True,  # its DataLoader workers live through a SIGTERM to all
        "validation.eval_interval": cfg.train.eval_interval,
        "validation.eval_iters": cfg.train.eval_iters,
        "optimizer.lr": lr.lr,
        "optimizer.min_lr": lr.min_lr,
        "optimizer.weight_decay": float(cfg.train.weight_decay),
        "optimizer.adam_beta1": float(cfg.train.adam_beta1),
        "optimizer.adam_beta2": float(cfg.train.adam_beta2),
        "optimizer.adam_eps": float(cfg.train.adam_eps),
        "optimizer.clip_grad": float(cfg.train.clip_grad),
        # megatron-core's OptimizerParamScheduler rewrites every group's weight decay at every step from
        # these, not from optimizer.weight_decay; Bridge's recipe helper leaves them at 0.033.
        "scheduler.start_weight_decay": float(cfg.train.weight_decay),
        "scheduler.end_weight_decay": float(cfg.train.weight_decay),
        "scheduler.weight_decay_incr_style": "constant",
        "scheduler.lr_warmup_iters": lr.warmup_iters,
        "scheduler.lr_warmup_init": lr.warmup_init,
        "scheduler.lr_decay_iters": lr.decay_iters,
        "scheduler.lr_decay_style": lr.style,
        "scheduler.lr_wsd_decay_style": lr.wsd_decay_style,
        "scheduler.lr_wsd_decay_iters": lr.decay_iters - lr.decay_start_iter if lr.style == "WSD" else None,
        "dataset.seq_length": phase.seq_length,
        "dataset.random_seed": cfg.train.seed,
        "dataset.per_split_data_args_path": str(Path(cfg.blend.out_dir) / f"{phase.blend}.json"),
        "dataset.path_to_cache": cfg.blend.cache_dir,
        "dataset.num_workers": int(cfg.train.num_workers),
        "dataset.mmap_bin_files": True,
        # megatron-core's default builds a seq x seq causal mask in every data-loader worker (a float32 tensor of
        # 16 GiB at 64k, 64 GiB at 128k) that the recipe then never sends to the GPU (its attention makes its own
        # mask): at long context the workers exhaust host memory and are killed (issue 13).
        "dataset.create_attention_mask": False,
        # The recipe's native fused cross entropy is torch.compile'd; in the backward, Inductor's autotuner finds no
        # GPU room to clone the logits-sized gradient it mutates and parks it in pinned host memory, which torch
        # then keeps: one or two fp32 copies of the rank's logits (32 GiB at 64k with CP 2, 64 at 128k: issue 13's
        # kills). TE's kernels are not autotuned; they compute the gradient in the forward (plan.LOGITS_BYTES).
        "model.cross_entropy_loss_fusion": True,
        "model.cross_entropy_fusion_impl": CROSS_ENTROPY,
        **{f"tokenizer.{k}": v for k, v in bridge_tokenizer_fields(tok_dir, tokenizer_kind(cfg.tokenizer)).items()},
        "tokenizer.use_tokenizer_vocab_size": cfg.model.vocab_size is None,
        "checkpoint.save": run_dir,
        "checkpoint.load": run_dir,
        "checkpoint.save_interval": save_interval(params, section),
        "checkpoint.most_recent_k": keep_checkpoints(params.settings.train),
        "checkpoint.pretrained_checkpoint": pretrained,
        "checkpoint.ckpt_format": "torch_dist",
        "checkpoint.async_save": False,
        "logger.log_interval": cfg.train.log_interval,
        "logger.tensorboard_dir": str(Path(run_dir) / "tensorboard"),
        "rng.seed": cfg.train.seed,
        "mixed_precision": PRECISIONS[cfg.train.precision],  # a key of PRECISIONS: the typed sections checked it
    })
    if "fp8" in cfg.train.precision:  # set on the recipe object the line above names; said for every FP8
        # recipe, as Bridge's own defaults differ (current scaling keeps the edges in BF16, delayed and blockwise not)
        o["mixed_precision.first_last_layers_bf16"] = bool(cfg.train.fp8_edge_layers_bf16)
    if layout.tp == 1:
        o["comm_overlap"] = None  # the recipe's TP communication overlap needs TP > 1
    if cfg.wandb.enabled:
        o.update({"logger.wandb_project": cfg.wandb.project, "logger.wandb_entity": cfg.wandb.entity,
                  "logger.wandb_exp_name": f"{phase.name}-{Path(run_dir).name}"})
    extra = cfg.train.bridge_overrides or {}
    owned = sorted(set(extra) & set(STAGE_OWNED))
    if owned:
        raise UserError(f"{params.source}: train.bridge_overrides.{owned[0]}: {STAGE_OWNED[owned[0]]}")
    o.update(extra)
    return o


def tokenizer_kind(tokenizer: TokenizerConfig) -> str:
    """The tokenizer directory's kind: as its info.json says, or, before the tokenizer stage ran (make plan), as
    params.yaml will make it (`train`: SentencePiece; a hub name or directory: Hugging Face)."""
    if (Path(tokenizer.dir) / INFO_FILE).exists():
        return read_info(tokenizer.dir).kind
    return "sentencepiece" if tokenizer.name == "train" else "huggingface"


def save_interval(params, section: str) -> int:
    """Iterations between checkpoints: train.save_interval, or train.save_minutes at the plan's time per iteration."""
    if params.settings.train.save_minutes is None:
        return params.settings.train.save_interval
    from nano3.train.plan import build_plan

    return build_plan(params, stages=(section,)).stages[section].save_interval(params.settings.train)


def keep_checkpoints(train: TrainConfig) -> int:
    """`train.keep_checkpoints` as Bridge's most_recent_k: null keeps every checkpoint (-1)."""
    keep = train.keep_checkpoints  # >= 1 or null: the typed sections checked it
    return -1 if keep is None else keep

