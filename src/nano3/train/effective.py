"""The effective configuration: what a training run actually uses, read back from its live objects.

A config file says what was asked for; Megatron-Bridge's recipe defaults, its finalize() and
megatron-core's schedulers decide what runs (a recipe helper once left the applied weight decay at
0.033 while the config said 0.1). So each run writes `effective_config.<phase>.json` next to its
`spec.<phase>.json` (train.spec), built from the optimizer's parameter groups, the LR/weight-decay
scheduler, the model's config and weights, the process groups and the data config after set-up,
and `expected(spec)` derives the same document from the phase's spec. conform.py compares the two.

Both documents are nested dicts; `flatten` turns them into dotted keys for the comparison. Readers of
live objects import torch / megatron lazily, so this module imports on any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nano3.files import atomic_write_json

FILE = "effective_config.{phase}.json"


def effective_path(run_dir: str | Path, phase: str) -> Path:
    return Path(run_dir) / FILE.format(phase=phase)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def summarize_groups(groups: list[dict]) -> dict[str, Any]:
    """Per-group optimizer settings -> what the conformance check compares.

    Parameters split into a decayed group and a no-decay group (biases, norms and other 1-D tensors);
    the largest weight decay among non-empty groups is the decayed one's, the smallest the no-decay one's.
    Betas and eps must be the same in every group; where they are not, the list of values is kept so the
    comparison fails on it.
    """
    live = [g for g in groups if g["params"] > 0] or groups

    def agreed(values: list):
        distinct = []
        for value in values:
            if value not in distinct:
                distinct.append(value)
        return distinct[0] if len(distinct) == 1 else distinct

    return {"weight_decay": max(g["weight_decay"] for g in live),
            "no_decay_weight_decay": min(g["weight_decay"] for g in live),
            "adam_beta1": agreed([g["betas"][0] for g in live]),
            "adam_beta2": agreed([g["betas"][1] for g in live]),
            "adam_eps": agreed([g["eps"] for g in live]),
            "params_decayed": sum(g["params"] for g in live if g["weight_decay"] > 0),
            "params_not_decayed": sum(g["params"] for g in live if g["weight_decay"] == 0)}


def read_groups(param_groups) -> list[dict]:
    """lr, weight decay, betas, eps and the number of parameters of each optimizer parameter group."""
    out = []
    for group in param_groups:
        lr = group.get("lr")
        out.append({"lr": float(lr.item() if hasattr(lr, "item") else lr),
                    "weight_decay": float(group.get("weight_decay", 0.0)),
                    "betas": [float(b) for b in group.get("betas", (None, None))],
                    "eps": float(group["eps"]) if group.get("eps") is not None else None,
                    "params": int(sum(p.numel() for p in group["params"])),
                    "wd_mult": float(group.get("wd_mult", 1.0))})
    return out


def expected(spec: dict) -> dict:
    """What a phase must run with, in the effective file's shape: its spec's Bridge fields (train.spec) and the
    few values it records beside them."""
    from nano3.train.mapping import PRECISIONS

    b, d = spec["bridge"], spec["derived"]
    wsd = b["scheduler.lr_decay_style"] == "WSD"
    fp8 = "mixed_precision.first_last_layers_bf16" in b
    precision = {bridge: ours for ours, bridge in PRECISIONS.items()}.get(b["mixed_precision"], b["mixed_precision"])
    return {
        "backend": d["backend"],
        **({"environment": d["environment"]} if "environment" in d else {}),
        "optimizer": {"weight_decay": b["optimizer.weight_decay"], "no_decay_weight_decay": 0.0,
                      "adam_beta1": b["optimizer.adam_beta1"], "adam_beta2": b["optimizer.adam_beta2"],
                      "adam_eps": b["optimizer.adam_eps"], "clip_grad": b["optimizer.clip_grad"]},
        "weight_decay_applied": {"first_step": b["scheduler.start_weight_decay"],
                                 "last_step": b["scheduler.end_weight_decay"]},
        "scheduler": {"max_lr": b["optimizer.lr"], "min_lr": b["optimizer.min_lr"],
                      "lr_warmup_init": b["scheduler.lr_warmup_init"], "warmup_iters": b["scheduler.lr_warmup_iters"],
                      "decay_iters": b["scheduler.lr_decay_iters"], "decay_style": b["scheduler.lr_decay_style"],
                      **({"wsd_decay_style": b["scheduler.lr_wsd_decay_style"],
                          "wsd_decay_iters": b["scheduler.lr_wsd_decay_iters"]} if wsd else {}),
                      "start_weight_decay": b["scheduler.start_weight_decay"],
                      "end_weight_decay": b["scheduler.end_weight_decay"],
                      "weight_decay_incr_style": b["scheduler.weight_decay_incr_style"]},
        "precision": precision,
        "fp8_edge_layers_bf16": b["mixed_precision.first_last_layers_bf16"] if fp8 else None,
        "parallel": {"tp": b["model.tensor_model_parallel_size"], "pp": b["model.pipeline_model_parallel_size"],
                     "cp": b["model.context_parallel_size"], "ep": b["model.expert_model_parallel_size"],
                     "etp": b["model.expert_tensor_parallel_size"], "dp": d["dp"], "world": d["world"],
                     "sequence_parallel": b["model.sequence_parallel"]},
        "batch": {"seq_length": b["model.seq_length"], "global_batch_size": b["train.global_batch_size"],
                  "micro_batch_size": b["train.micro_batch_size"], "train_iters": b["train.train_iters"]},
        "vocab": d["vocab"],
        "moe": {"num_experts": b["model.num_moe_experts"], "topk": b["model.moe_router_topk"],
                "score_function": b["model.moe_router_score_function"],
                "topk_scaling_factor": b["model.moe_router_topk_scaling_factor"],
                "expert_bias": b["model.moe_router_enable_expert_bias"],
                "bias_update_rate": b["model.moe_router_bias_update_rate"],
                "aux_loss_type": b["model.moe_router_load_balancing_type"], "aux_loss_coeff": b["model.moe_aux_loss_coeff"]},
        "init_std": b["model.init_method_std"],
        "data": {"seed": b["dataset.random_seed"], "blend": d["blend"], "train_samples": d["train_samples"],
                 "sample_offset": d["sample_offset"]},
    }


def write(run_dir: str | Path, phase: str, doc: dict) -> Path:
    path = effective_path(run_dir, phase)
    atomic_write_json(path, doc)
    return path


# ---- Megatron-Bridge: read from the live objects at on_train_start (GPU machines only) ----------------------------

def _environment(keys) -> dict:
    import os

    return {k: os.environ.get(k) for k in sorted(keys)}


def _allocator() -> dict:
    """What PYTORCH_CUDA_ALLOC_CONF asked of torch's CUDA allocator, and what it runs: a setting read after the
    allocator started is ignored, so the segments it made say whether it took effect."""
    import os

    import torch

    from nano3.train.environment import expandable_segments

    flags = [s["is_expandable"] for s in torch.cuda.memory_snapshot() if "is_expandable" in s]
    return {"asked": {"expandable_segments": expandable_segments(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))},
            "expandable_segments": any(flags) if flags else None}


def from_megatron(context, phase: str, requested: dict | None = None, env_keys=()) -> dict:
    """The effective configuration of a Bridge run, from the objects its training loop uses; `requested`:
    what the phase's dataset provider asked megatron-core for (entry.PhaseWindow), None where it did not run;
    `env_keys`: the variables whose values the rank had are recorded (nano3.train.environment)."""
    cfg = context.state.cfg
    model_config = _unwrap(context.model[0]).config
    scheduler = context.scheduler
    gbs = cfg.train.global_batch_size
    groups = read_groups(context.optimizer.param_groups)
    summary = summarize_groups(groups)
    return {
        "backend": "megatron", "phase": phase, "source": "live objects at on_train_start (Megatron-Bridge)",
        "environment": _environment(env_keys), "allocator": _allocator(),
        "optimizer": {**summary, "clip_grad": float(context.optimizer.config.clip_grad), "groups": groups},
        "weight_decay_applied": {"first_step": summary["weight_decay"]},
        "scheduler": {"max_lr": scheduler.max_lr, "min_lr": scheduler.min_lr, "lr_warmup_init": scheduler.init_lr,
                      "warmup_iters": _iters(scheduler.lr_warmup_steps, gbs),
                      "decay_iters": _iters(scheduler.lr_decay_steps, gbs), "decay_style": scheduler.lr_decay_style,
                      **({"wsd_decay_style": scheduler.lr_wsd_decay_style,
                          "wsd_decay_iters": _iters(scheduler.wsd_decay_steps, gbs)}
                         if scheduler.lr_decay_style == "WSD" else {}),
                      "start_weight_decay": scheduler.start_wd, "end_weight_decay": scheduler.end_wd,
                      "weight_decay_incr_style": scheduler.wd_incr_style},
        "precision": _precision_name(model_config),
        "fp8_edge_layers_bf16": bool(getattr(model_config, "first_last_layers_bf16", False)) if model_config.fp8 else None,
        "precision_detail": {"bf16": bool(model_config.bf16), "fp8": model_config.fp8,
                             "fp8_recipe": getattr(model_config, "fp8_recipe", None),
                             "params_dtype": str(model_config.params_dtype).replace("torch.", "")},
        "parallel": _process_groups(model_config),
        "batch": {"seq_length": int(cfg.model.seq_length), "dataset_seq_length": int(cfg.dataset.seq_length),
                  "global_batch_size": gbs, "micro_batch_size": cfg.train.micro_batch_size,
                  "train_iters": cfg.train.train_iters, "exit_interval": cfg.train.exit_interval},
        "vocab": {"tokenizer": int(context.state.tokenizer.vocab_size),
                  "model": _embedding_rows(context.model) * _parallel_size("tensor_model_parallel", model_config)},
        "moe": {"num_experts": model_config.num_moe_experts, "topk": model_config.moe_router_topk,
                "score_function": model_config.moe_router_score_function,
                "topk_scaling_factor": model_config.moe_router_topk_scaling_factor,
                "expert_bias": bool(model_config.moe_router_enable_expert_bias),
                "bias_update_rate": model_config.moe_router_bias_update_rate,
                "aux_loss_type": model_config.moe_router_load_balancing_type,
                "aux_loss_coeff": model_config.moe_aux_loss_coeff},
        "init_std": model_config.init_method_std,
        "loss": {"fusion": bool(getattr(model_config, "cross_entropy_loss_fusion", False)),
                 "impl": getattr(model_config, "cross_entropy_fusion_impl", None)},
        "data": {"seed": cfg.dataset.random_seed, "blend": blend_shares(cfg.dataset.blend_per_split),
                 **(requested or {"bridge_train_samples": _requested_samples(cfg)[0]}),
                 "consumed_train_samples_at_start": int(context.state.train_state.consumed_train_samples)},
    }


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _iters(steps, gbs: int):
    return None if steps is None else round(steps / gbs)


def _precision_name(model_config) -> str:
    if not model_config.fp8:
        return "bf16" if model_config.bf16 else str(model_config.params_dtype).replace("torch.", "")
    recipe = getattr(model_config, "fp8_recipe", None)
    return {"mxfp8": "mxfp8", "delayed": "fp8_delayed", "blockwise": "fp8_blockwise"}.get(recipe, "fp8")


def _parallel_size(name: str, model_config) -> int:
    """A parallel size from megatron-core's initialised process groups (the config's value if none)."""
    from megatron.core import parallel_state as ps

    getter = getattr(ps, f"get_{name}_world_size", None)
    try:
        return int(getter())
    except Exception:
        return int(getattr(model_config, f"{name}_size"))


def _process_groups(model_config) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {"tp": _parallel_size("tensor_model_parallel", model_config),
            "pp": _parallel_size("pipeline_model_parallel", model_config),
            "cp": _parallel_size("context_parallel", model_config),
            "ep": _parallel_size("expert_model_parallel", model_config),
            "etp": _parallel_size("expert_tensor_parallel", model_config),
            "dp": int(ps.get_data_parallel_world_size()),
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "sequence_parallel": bool(model_config.sequence_parallel)}


def _embedding_rows(model_chunks) -> int:
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if name.endswith("word_embeddings.weight"):
                return int(param.shape[0])
    raise RuntimeError("no word_embeddings.weight in the model (not on the first pipeline stage?)")


def blend_shares(blend_per_split) -> dict:
    """(prefixes, weights) | None per split (Bridge's blend_per_split; train and valid are read) ->
    {split: [[prefix, share], ...]} with the shares summing to 1: one form for params, Bridge and the reference."""
    out = {}
    for split, entry in zip(("train", "valid"), blend_per_split or (None, None)):
        if not entry:
            out[split] = None
            continue
        prefixes, weights = entry
        weights = weights or [1.0] * len(prefixes)
        out[split] = [[str(p), round(float(w) / sum(weights), 9)] for p, w in zip(prefixes, weights)]
    return out


def _requested_samples(cfg) -> tuple[int, int, int]:
    from megatron.bridge.data.loaders import get_train_valid_test_num_samples

    return tuple(int(n) for n in get_train_valid_test_num_samples(cfg))


def applied_weight_decay(param_groups) -> float:
    """The weight decay the next optimizer step applies to decayed parameters (the largest among groups)."""
    values = [float(g.get("weight_decay", 0.0)) for g in param_groups if sum(p.numel() for p in g["params"]) > 0]
    return max(values) if values else 0.0
