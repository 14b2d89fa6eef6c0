"""The dry run: what a training stage will do, and whether its parallel layout can work, before any job.

Pure Python (no Bridge, no GPU): token budgets -> iterations and the LR schedule (schedule.py), the
parallel layout checked against the GPUs and the model's shapes with the same divisibility rules
megatron-core enforces at start-up (plan.layout), a per-GPU and per-node memory estimate (plan.memory), and
GPU-hours at a measured throughput. An impossible layout fails here with a message naming the key, not minutes
into a job. `python -m nano3.train.plan --lc-layouts` prints the recipe's long-context layouts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from nano3.config.clusters import local_gpu_memory  # noqa: F401 (the plan's callers import it from here)
from nano3.errors import UserError
from nano3.model.flops import mixed_flops_per_token, padded_vocab, param_counts
from nano3.model.presets import ModelPreset, model_preset
from nano3.model.vocab import model_vocab
from nano3.schedule import TrainingSchedule, build_schedule
from nano3.train.plan.layout import Layout, layout_errors, local_gpus, read_layout, resources, validate_layout  # noqa: F401
from nano3.train.plan.memory import (  # noqa: F401 (the plan's callers import them from here)
    CROSS_ENTROPY,
    DEFAULT_GPU_MEMORY_GIB,
    GIB,
    HOST_RANK_GIB,
    HostEstimate,
    MemoryEstimate,
    cross_entropy_impl,
    estimate_host_memory,
    estimate_memory,
    fitting_layouts,
    kv_groups_hint,
    recomputes_moe,
)


@dataclass(frozen=True)
class StagePlan:
    layout: Layout
    memory: MemoryEstimate
    host: HostEstimate
    iterations: int
    tokens: int
    flops_per_token_true: float
    flops_per_token_bridge: float
    gpu_hours: float  # at train.measured_tflops_per_gpu (Bridge's formula)
    seconds_per_iteration: float  # wall time of one iteration at that throughput

    def save_interval(self, train) -> int:
        """Iterations between checkpoints: `train.save_minutes` of training turned into iterations, else
        `train.save_interval`."""
        if train.save_minutes is None:
            return train.save_interval
        return max(1, int(train.save_minutes * 60 // self.seconds_per_iteration))


@dataclass(frozen=True)
class Plan:
    preset_name: str
    preset: ModelPreset
    vocab: int
    params_total: int
    params_active: int
    schedule: TrainingSchedule
    stages: dict[str, StagePlan]

    def as_dict(self) -> dict:
        return {
            "model": {"preset": self.preset_name, "layers": self.preset.num_layers, "vocab_padded": self.vocab,
                      "params_total": self.params_total, "params_active": self.params_active,
                      **self.preset.bridge_fields()},
            "schedule": self.schedule.as_dict(),
            "stages": {name: {"layout": asdict(s.layout) | {"world": s.layout.world, "dp": s.layout.dp,
                                                            "microbatches": s.layout.microbatches},
                              "memory_gib": asdict(s.memory) | {"reserved_gib": s.memory.reserved_gib,
                                                                "total_gib": s.memory.total_gib},
                              "host_memory_gib": asdict(s.host) | {"total_gib": s.host.total_gib},
                              "iterations": s.iterations, "tokens": s.tokens,
                              "gflops_per_token": {"true": s.flops_per_token_true / 1e9,
                                                   "bridge": s.flops_per_token_bridge / 1e9},
                              "gpu_hours": s.gpu_hours, "seconds_per_iteration": s.seconds_per_iteration}
                       for name, s in self.stages.items()},
        }


def check_memory(stage: StagePlan, preset: ModelPreset, vocab: int, recompute_moe: bool, gpu_gib: float,
                 gpu_source: str, cross_entropy: str = CROSS_ENTROPY) -> None:
    """Refuse a layout whose per-GPU estimate exceeds the card, naming the nearest layouts that fit."""
    total, lay = stage.memory.total_gib, stage.layout
    if total <= gpu_gib:
        return
    fits = fitting_layouts(lay, preset, vocab, recompute_moe, gpu_gib, cross_entropy=cross_entropy)
    hint = "; ".join(f"{keys} ({gib:.1f} GiB)" for keys, gib in fits) or "none found up to 4x the nodes"
    raise UserError(f"{lay.stage}: the plan estimates {total:.1f} GiB per GPU (TP {lay.tp} PP {lay.pp} CP {lay.cp} "
                    f"EP {lay.ep} on {lay.world} GPUs, seq {lay.seq_length}) but {gpu_source} has {gpu_gib:.1f} GiB; "
                    f"nearest layouts that fit: {hint}")


def check_host_memory(stage: StagePlan, node_gib: float, node_source: str) -> None:
    """Refuse a layout whose ranks on one node need more host memory than the node has: issue 13's ranks were
    SIGKILLed for it, mid-run, with nothing in the log."""
    host, lay = stage.host, stage.layout
    need = lay.gpus_per_node * host.total_gib
    if need <= node_gib:
        return
    raise UserError(f"{lay.stage}: the plan estimates {host.total_gib:.1f} GiB of host memory per rank (process "
                    f"{host.rank_gib:.1f} + data loader {host.loader_gib:.1f} + checkpoint staging "
                    f"{host.checkpoint_gib:.1f}), {need:.0f} GiB for the {lay.gpus_per_node} ranks of a node, but "
                    f"{node_source} has {node_gib:.0f} GiB; lower train.num_workers, or spread the model over more "
                    f"GPUs (a larger TP, PP or EP stages a smaller checkpoint shard per rank)")


def build_plan(params, stages: tuple[str, ...] = ("train", "lc"), cluster_shape: tuple[int, int] | None = None,
               gpu_memory: tuple[float, str] | None = None, host_memory: tuple[float, str] | None = None,
               tp_above_kv_groups: bool | None = None) -> Plan:
    """The plan of each stage; with `gpu_memory` (GiB, where the number comes from) every stage must fit it, and
    with `host_memory` (a node's) every stage's ranks on one node must fit that. `tp_above_kv_groups`: what the
    stack that runs it can do (a profile's image); None: the installed megatron-core's, or yes where none is."""
    from nano3.megatron_compat import tp_splits_kv_groups

    if tp_above_kv_groups is None:
        tp_above_kv_groups = tp_splits_kv_groups() is not False
    preset = model_preset(params.settings.model)
    schedule = build_schedule(params.settings)
    raw_vocab = model_vocab(params)
    measured = float(params.settings.train.measured_tflops_per_gpu)
    recompute_moe = recomputes_moe(params.settings.train)
    cross_entropy = cross_entropy_impl(params)
    out = {}
    for stage in stages:
        layout = read_layout(params, stage, cluster_shape)
        vocab = padded_vocab(raw_vocab, preset, layout.tp)
        cannot_split = not tp_above_kv_groups and layout.tp > preset.num_query_groups  # refused: say what builds
        validate_layout(layout, preset, tp_above_kv_groups, hint=kv_groups_hint(
            layout, preset, vocab, recompute_moe, gpu_memory, cross_entropy) if cannot_split else "")
        iterations = schedule.pretrain_iters if stage == "train" else schedule.lc_iters
        tokens = iterations * layout.global_batch_size * layout.seq_length
        mix = params.settings.lc.mix if stage == "lc" else None
        true_f, bridge_f = (mixed_flops_per_token(preset, layout.seq_length, vocab, kind, mix)
                            for kind in ("true", "bridge"))
        hours = tokens * bridge_f / (measured * 1e12) / 3600
        per_iteration = hours * 3600 / max(iterations, 1) / layout.world
        memory = estimate_memory(layout, preset, vocab, recompute_moe, cross_entropy)
        host = estimate_host_memory(layout, memory, params.settings.train.num_workers)
        out[stage] = StagePlan(layout, memory, host, iterations, tokens, true_f, bridge_f, hours, per_iteration)
        if gpu_memory is not None:
            check_memory(out[stage], preset, vocab, recompute_moe, *gpu_memory, cross_entropy=cross_entropy)
        if host_memory is not None:
            check_host_memory(out[stage], *host_memory)
    vocab = padded_vocab(raw_vocab, preset)
    counts = param_counts(preset, vocab)
    return Plan(params.settings.model.preset, preset, vocab, counts.total, counts.active, schedule, out)


# The recipe's long-context lengths and the GPU counts it names for them (tech report: 512k mixed with 4k; the
# recipe document: up to 1M), on its layout TP 8, PP 4, CP 8, EP 8.
PRODUCTION_LC = ((524288, 256), (1048576, 512))


def production_lc_layouts(params, gpu_gib: float = DEFAULT_GPU_MEMORY_GIB) -> list[dict]:
    """Per-GPU memory of the recipe's LC layout at each production length, whether it fits `gpu_gib`, and the
    nearest layouts that do. Estimates of this plan (train.plan.estimate_memory), not measurements."""
    preset = model_preset(params.settings.model)
    recompute_moe = recomputes_moe(params.settings.train)
    cross_entropy = cross_entropy_impl(params)
    base = read_layout(params, "lc", cluster_shape=(1, 8))
    vocab = padded_vocab(model_vocab(params), preset, 8)  # the layout's TP 8
    rows = []
    for seq, gpus in PRODUCTION_LC:
        layout = replace(base, nodes=gpus // 8, gpus_per_node=8, tp=8, pp=4, cp=8, ep=8, sequence_parallel=True,
                         seq_length=seq)
        gib = estimate_memory(layout, preset, vocab, recompute_moe, cross_entropy).total_gib
        fits = gib <= gpu_gib
        rows.append({"seq_length": seq, "gpus": gpus, "layout": "TP 8 PP 4 CP 8 EP 8", "gib": gib, "fits": fits,
                     "alternatives": [] if fits else fitting_layouts(layout, preset, vocab, recompute_moe, gpu_gib,
                                                                     cross_entropy=cross_entropy)})
    return rows


def check_first_save(stage: StagePlan, train, limit_seconds: int, where: str) -> None:
    """A job whose time limit ends before the plan's first periodic save saves only at the time-limit signal: say
    so in one line before anything is queued."""
    every = stage.save_interval(train)
    first = every * stage.seconds_per_iteration
    if first >= limit_seconds:
        raise UserError(f"{stage.layout.stage}: the plan's first checkpoint comes {first / 3600:.1f} h into a job "
                        f"({every} iterations x {stage.seconds_per_iteration:.0f} s at train.measured_tflops_per_gpu) "
                        f"but {where} ends jobs after {limit_seconds / 3600:.1f} h; set train.save_minutes (e.g. "
                        f"{max(10, limit_seconds // 240)}) or a lower train.save_interval")
