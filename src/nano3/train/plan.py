"""The dry run: what a training stage will do, and whether its parallel layout can work, before any job.

Pure Python (no Bridge, no GPU): token budgets -> iterations and the LR schedule (schedule.py), the
parallel layout checked against the GPUs and the model's shapes with the same divisibility rules
megatron-core enforces at start-up, a per-GPU memory estimate, and GPU-hours at a measured
throughput. An impossible layout fails here with a message naming the key, not minutes into a job.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

from nano3.config.clusters import local_gpu_memory  # noqa: F401 (the plan's callers import it from here)
from nano3.errors import UserError
from nano3.model.flops import mixed_flops_per_token, padded_vocab, param_counts
from nano3.model.presets import ModelPreset, model_preset
from nano3.model.vocab import model_vocab
from nano3.schedule import TrainingSchedule, build_schedule

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 79.6  # an H100 80GB as CUDA reports it (81,559 MiB): the card a plan assumes by default


@dataclass(frozen=True)
class Layout:
    stage: str  # train | lc: the params section it comes from
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    sequence_parallel: bool
    micro_batch_size: int
    global_batch_size: int
    seq_length: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.pp * self.ep * self.etp)

    @property
    def microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def resources(params, stage: str, cluster_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node): params.yaml's when set, else the cluster profile's, else the Slurm
    allocation this runs in, else this machine (all its GPUs, at least 1 for planning)."""
    if cluster_shape is not None:
        default = cluster_shape
    elif "SLURM_JOB_NUM_NODES" in os.environ:
        default = (int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ.get("SLURM_GPUS_ON_NODE", "1") or 1))
    else:
        default = None
    section = getattr(params.settings, stage)
    nodes, gpus = section.nodes, section.gpus_per_node
    if default is None and (nodes is None or gpus is None):
        default = (1, max(1, local_gpus()))
    return (nodes if nodes is not None else default[0], gpus if gpus is not None else default[1])


def read_layout(params, stage: str, cluster_shape: tuple[int, int] | None = None) -> Layout:
    section = getattr(params.settings, stage)
    par = section.parallel
    nodes, gpus = resources(params, stage, cluster_shape)
    sequence_parallel = par.sequence_parallel if par.sequence_parallel is not None else par.tp > 1
    return Layout(stage=stage, nodes=nodes, gpus_per_node=gpus, tp=par.tp, pp=par.pp, cp=par.cp, ep=par.ep,
                  etp=par.etp, sequence_parallel=sequence_parallel, micro_batch_size=section.micro_batch_size,
                  global_batch_size=section.global_batch_size, seq_length=section.seq_length)


def layout_errors(layout: Layout, preset: ModelPreset, tp_above_kv_groups: bool = True) -> list[str]:
    """Every reason megatron-core would refuse this layout (empty when it is valid); `tp_above_kv_groups`: whether
    the stack that runs it splits a KV group over TP ranks (megatron_compat.tp_splits_kv_groups)."""
    s, errs = layout.stage, []
    p = f"{s}.parallel"
    if layout.world < 1:
        return [f"{s}.nodes x {s}.gpus_per_node must be at least 1 GPU"]
    model_par = layout.tp * layout.pp * layout.cp
    if layout.world % model_par:
        errs.append(f"{p}: TP x PP x CP = {layout.tp}x{layout.pp}x{layout.cp} = {model_par} does not divide "
                    f"the {layout.world} GPUs ({layout.nodes} nodes x {layout.gpus_per_node})")
        return errs
    if (layout.world // layout.pp) % (layout.ep * layout.etp):
        errs.append(f"{p}: EP x ETP = {layout.ep * layout.etp} does not divide the {layout.world // layout.pp} GPUs "
                    f"of a pipeline stage")
    if preset.num_moe_experts % layout.ep:
        errs.append(f"{p}.ep={layout.ep} does not divide the {preset.num_moe_experts} experts")
    if preset.num_layers % layout.pp:
        errs.append(f"{p}.pp={layout.pp} does not divide the {preset.num_layers} layers")
    if preset.num_attention_heads % layout.tp:
        errs.append(f"{p}.tp={layout.tp} does not divide the {preset.num_attention_heads} attention heads")
    if preset.num_query_groups % layout.tp and layout.tp % preset.num_query_groups:
        errs.append(f"{p}.tp={layout.tp} must divide or be a multiple of the {preset.num_query_groups} KV groups")
    elif layout.tp > preset.num_query_groups and not tp_above_kv_groups:
        errs.append(f"{p}.tp={layout.tp} is above the {preset.num_query_groups} KV groups, which the stack that runs "
                    f"it cannot split (megatron-core splits them from 0.16.0)")
    if preset.mamba_num_groups % layout.tp:
        errs.append(f"{p}.tp={layout.tp} does not divide the {preset.mamba_num_groups} Mamba groups")
    elif layout.cp > 1:
        heads_local, groups_local = preset.mamba_num_heads // layout.tp, preset.mamba_num_groups // layout.tp
        if heads_local % layout.cp:
            errs.append(f"{p}.cp={layout.cp} does not divide the {heads_local} Mamba heads per TP rank")
        elif (groups_local < layout.cp and layout.cp % groups_local) or (groups_local >= layout.cp and groups_local % layout.cp):
            errs.append(f"{p}.cp={layout.cp} and the {groups_local} Mamba groups per TP rank must divide one another")
    if layout.tp > 1 and layout.ep > 1 and not layout.sequence_parallel:
        errs.append(f"{p}: MoE with TP > 1 needs sequence_parallel: true")
    if layout.cp > 1 and layout.seq_length % (2 * layout.cp):
        errs.append(f"{s}.seq_length={layout.seq_length} must be divisible by 2 x CP = {2 * layout.cp}")
    if layout.sequence_parallel and (layout.seq_length // layout.cp) % layout.tp:
        errs.append(f"{s}.seq_length / CP must be divisible by TP={layout.tp} with sequence parallelism")
    if layout.global_batch_size % (layout.micro_batch_size * layout.dp):
        errs.append(f"{s}.global_batch_size={layout.global_batch_size} is not a multiple of micro_batch_size x DP = "
                    f"{layout.micro_batch_size}x{layout.dp}")
    return errs


def kv_groups_hint(layout: Layout, preset: ModelPreset, vocab: int, recompute_moe: bool,
                   gpu_memory: tuple[float, str] | None, cross_entropy: str) -> str:
    """The nearest layouts with TP within the KV groups that fit the GPU (said where a stack cannot split a group)."""
    gpu_gib = gpu_memory[0] if gpu_memory else DEFAULT_GPU_MEMORY_GIB
    fits = fitting_layouts(layout, preset, vocab, recompute_moe, gpu_gib, cross_entropy=cross_entropy,
                           tp_above_kv_groups=False)
    return "; nearest layouts that build there and fit: " + ("; ".join(f"{k} ({g:.1f} GiB)" for k, g in fits)
                                                             or "none up to 4x the nodes")


def validate_layout(layout: Layout, preset: ModelPreset, tp_above_kv_groups: bool = True, hint: str = "") -> None:
    errs = layout_errors(layout, preset, tp_above_kv_groups)
    if errs and hint and layout.tp > preset.num_query_groups and not tp_above_kv_groups:
        errs[0] += hint
    if errs:
        raise UserError(errs[0] if len(errs) == 1 else f"{errs[0]} (and {len(errs) - 1} more: {'; '.join(errs[1:])})")


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float  # inside the caching allocator: small buffers and fragmentation
    context_gib: float  # outside it: CUDA context, NCCL, cuBLAS workspaces

    @property
    def counted_gib(self) -> float:
        """Weights, gradients, optimizer states and activations: the tensors the layout decides."""
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib

    @property
    def allocated_gib(self) -> float:
        """The tensors' peak (`torch.cuda.max_memory_allocated`): the counted ones and the small buffers."""
        return self.counted_gib + SMALL_BUFFERS_GIB

    @property
    def reserved_gib(self) -> float:
        """What the caching allocator reserves at its peak (`torch.cuda.max_memory_reserved`)."""
        return self.counted_gib + self.overhead_gib

    @property
    def total_gib(self) -> float:
        """What the card must hold (nvidia-smi's figure for the process)."""
        return self.reserved_gib + self.context_gib


# The Megatron path's cross entropy (train/mapping.py sets TE's), unless train.bridge_overrides sets
# model.cross_entropy_fusion_impl back to megatron-core's native one. Bytes per token and vocabulary entry that the
# output layer holds at the loss, both measured on the reduced Nano 3 (2x H200, docs/benchmarks.md): native 10 (bf16
# logits, their fp32 copy and the fp32 softmax kept for the gradient); TE 4, the fp32 gradient its forward computes
# and keeps (TE >= 2.18; the bf16 logits are freed): at the same 16k tokens per GPU TE's runs allocated 12.0 GiB
# = 6 x vocab bytes per token less than native's, with and without MoE recompute.
CROSS_ENTROPY = "te"
LOGITS_BYTES = {"native": 10, "te": 4}
# With MoE recompute an E layer still keeps ~17.4 bytes per hidden unit per token (46.9 kB at h 2688), not just its
# input (2 bytes): measured as the per-token slope of the allocated peak at 32k-98k tokens per GPU, with and without
# the recompute; not derived term by term.
MOE_RECOMPUTED_BYTES_PER_HIDDEN = 17.4


def cross_entropy_impl(params) -> str:
    impl = (params.settings.train.bridge_overrides or {}).get("model.cross_entropy_fusion_impl", CROSS_ENTROPY)
    if impl not in LOGITS_BYTES:
        raise UserError(f"{params.source}: train.bridge_overrides.model.cross_entropy_fusion_impl={impl!r}: "
                        f"megatron-core knows {' and '.join(sorted(LOGITS_BYTES))}")
    return impl


def activation_bytes_per_token(preset: ModelPreset, vocab: int, tp: int, recompute_moe: bool,
                               cross_entropy: str = CROSS_ENTROPY) -> tuple[float, float]:
    """Rough bf16 bytes kept per token for the backward pass (no full recompute): (all layers, the output layer
    at the loss). Apart because with pipeline parallelism they live on different stages."""
    h, d_in = preset.hidden_size, preset.mamba_num_heads * preset.mamba_head_dim
    gn = preset.mamba_num_groups * preset.mamba_state_dim
    q, kv = preset.num_attention_heads * preset.kv_channels, preset.num_query_groups * preset.kv_channels
    mamba = 2 * (h + 7 * d_in + 4 * gn + preset.mamba_num_heads) / tp + 4 * d_in * preset.mamba_state_dim / 256 / tp
    attention = 2 * (2 * h + 3 * q + 2 * kv) / tp
    k = preset.moe_router_topk
    # With TP > 1 MoE layers run sequence parallel (layout_errors), so a TP rank routes its own 1/TP of the tokens.
    moe = (MOE_RECOMPUTED_BYTES_PER_HIDDEN * h if recompute_moe else
           2 * (2 * h + k * (2 * h + 2 * preset.moe_ffn_hidden_size) + 2 * preset.moe_shared_expert_intermediate_size)
           + 4 * preset.num_moe_experts) / tp
    mlp = 2 * (2 * h + 2 * preset.ffn_hidden_size / tp)
    # The output layer at the loss (LOGITS_BYTES): at 131k vocab 0.5-1.3 MB per token, as much as 4-10 MoE layers.
    logits = LOGITS_BYTES[cross_entropy] * vocab / tp
    n_m, n_a, n_e, n_d = (preset.count(c) for c in "M*E-")
    return n_m * mamba + n_a * attention + n_e * moe + n_d * mlp, logits


# Measured on the bench's reduced Nano 3 (docs/benchmarks.md, 2x H200, 13 runs: 4k-196k tokens, DP 2 or CP 2,
# TE and native cross entropy, with and without MoE recompute). The allocated peak is the counted tensors plus
# ~0.8 GiB of small buffers: within 2% at all 11 runs that report it. What the caching allocator reserves above
# that varied from 13% to 44% of the activations, by run rather than by layout (two runs of one 64k layout: ~15%
# and 44%). 22% puts the estimate within 5% of the reserved peak at 11 of those 13 runs (4k to 196k); the two others
# are recompute runs that kept 36-44% (-6% and -9%). Beside the allocator, nvidia-smi showed the process 1.4 GiB
# above its reserved peak.
SMALL_BUFFERS_GIB = 0.8
FRAGMENTATION = 0.22
CONTEXT_GIB = 1.5


def estimate_memory(layout: Layout, preset: ModelPreset, vocab: int, recompute_moe: bool,
                    cross_entropy: str = CROSS_ENTROPY) -> MemoryEstimate:
    """Per-GPU memory of the busiest pipeline stage. With 1F1B, stage i keeps the activations of PP - i
    microbatches of its layers; the output layer's (logits and their gradient) live on the last stage only, for
    the one microbatch it holds. So the first stage is busiest unless the logits outweigh its extra microbatches."""
    counts = param_counts(preset, vocab)
    dense_local = (counts.dense / layout.pp + counts.embedding / min(layout.pp, 2)) / layout.tp
    experts_local = counts.experts / layout.pp / (layout.ep * layout.etp)
    params_local = dense_local + experts_local
    weights = 2 * params_local  # bf16
    grads = 2 * params_local  # bf16 gradient buffers (the recipe's grad_reduce_in_fp32=False)
    # Distributed optimizer: fp32 master weights + two Adam moments, sharded over the data-parallel ranks.
    optimizer = 12 * (dense_local / (layout.dp * layout.cp) + experts_local / layout.expert_dp)
    tokens = layout.micro_batch_size * layout.seq_length / layout.cp
    layers, logits = activation_bytes_per_token(preset, vocab, layout.tp, recompute_moe, cross_entropy)
    first = layers / layout.pp * min(layout.pp, layout.microbatches) + (logits if layout.pp == 1 else 0)
    last = layers / layout.pp + logits
    activations = tokens * max(first, last)
    overhead = SMALL_BUFFERS_GIB * GIB + FRAGMENTATION * activations
    return MemoryEstimate(weights / GIB, grads / GIB, optimizer / GIB, activations / GIB, overhead / GIB, CONTEXT_GIB)


# One rank's host process (torch, CUDA/NCCL host state, Megatron's Python): 7.5 GiB peak measured for the tiny
# model's lc at 128k, CP 2, no workers (H200, Bridge 0.6.2); one forked data-loader worker's own pages: 0.2 GiB
# measured on the CPU at 8k-128k (docs/benchmarks.md, "Host memory at long context").
HOST_RANK_GIB = 8.0
# A torch_dist save copies each tensor into pinned host memory from torch's caching host allocator, which rounds
# every block up to a power of two and keeps it after the save. For sizes spread evenly on a log scale the
# expected rounding is 1/ln 2 = 1.44; measured on the reduced Nano 3 (2x H200): 22.6 GiB staged for 15.8 GiB of
# weights and optimizer shard, at 4k with DP 2 and at 64k with CP 2 (docs/benchmarks.md).
PINNED_ROUNDING = 1 / math.log(2)
HOST_WORKER_GIB = 0.5
LOADER_PREFETCH = 2  # batches each worker keeps ready (torch's DataLoader default)


@dataclass(frozen=True)
class HostEstimate:
    rank_gib: float
    loader_gib: float
    checkpoint_gib: float

    @property
    def total_gib(self) -> float:
        return self.rank_gib + self.loader_gib + self.checkpoint_gib


def estimate_host_memory(layout: Layout, memory: MemoryEstimate, workers: int) -> HostEstimate:
    """Peak host memory of one rank. Linear in the sequence length: the data loader's batches hold tokens, labels
    and position ids (int64) and the loss mask (fp32) of each sample, and no seq x seq attention mask (mapping.py
    turns megatron-core's off). A torch_dist save stages the rank's weights and optimizer shard in pinned host
    memory, rounded up per tensor, and keeps it."""
    batch = layout.micro_batch_size * layout.seq_length * (3 * 8 + 4)
    loader = workers * (HOST_WORKER_GIB * GIB + LOADER_PREFETCH * batch)
    return HostEstimate(HOST_RANK_GIB, loader / GIB, PINNED_ROUNDING * (memory.weights_gib + memory.optimizer_gib))


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


def fitting_layouts(layout: Layout, preset: ModelPreset, vocab: int, recompute_moe: bool, gpu_gib: float,
                    limit: int = 3, cross_entropy: str = CROSS_ENTROPY,
                    tp_above_kv_groups: bool = True) -> list[tuple[str, float]]:
    """The valid layouts nearest to `layout` whose estimate fits `gpu_gib`: first on the same nodes with the
    fewest parallel sizes changed, then on twice and four times the nodes. [(params keys, GiB), ...]"""
    sizes = [1, 2, 4, 8, 16, 32, 64]
    found = []
    for nodes in (layout.nodes, 2 * layout.nodes, 4 * layout.nodes):
        for tp in [t for t in sizes if t <= layout.gpus_per_node]:
            for pp in sizes:
                for cp in sizes:
                    for ep in sizes:
                        cand = replace(layout, nodes=nodes, tp=tp, pp=pp, cp=cp, ep=ep,
                                       sequence_parallel=layout.sequence_parallel or tp > 1)
                        if cand.world % (tp * pp * cp) or layout_errors(cand, preset, tp_above_kv_groups):
                            continue
                        gib = estimate_memory(cand, preset, vocab, recompute_moe, cross_entropy).total_gib
                        if gib <= gpu_gib:
                            changed = [(k, getattr(cand, k)) for k in ("tp", "pp", "cp", "ep", "sequence_parallel")
                                       if getattr(cand, k) != getattr(layout, k)]
                            found.append((nodes, len([k for k, _ in changed if k != "sequence_parallel"]), gib,
                                          changed))
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    out = []
    for nodes, _, gib, changed in found[:limit]:
        keys = ([f"{layout.stage}.nodes={nodes}"] if nodes != layout.nodes else []) + \
               [f"{layout.stage}.parallel.{k}={str(v).lower()}" for k, v in changed]
        out.append((" ".join(keys), gib))
    return out


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


def recomputes_moe(train) -> bool:
    """Whether selective recompute drops the MoE activations (train.recompute_modules), as the memory estimate counts."""
    return "moe" in (train.recompute_modules or [])


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


def main(argv: list[str] | None = None) -> None:
    """`python -m nano3.train.plan --lc-layouts [--params configs/nano3.yaml] [--gpu-memory GIB]`."""
    import argparse
    import sys

    from rich.console import Console
    from rich.table import Table

    from nano3.config import load_params

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--lc-layouts", action="store_true", help="the recipe's long-context layouts at 512k and 1M")
    ap.add_argument("--params", default="configs/nano3.yaml")
    ap.add_argument("--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GIB, metavar="GIB")
    args = ap.parse_args(argv)
    if not args.lc_layouts:
        ap.error("nothing to print; pass --lc-layouts")
    try:
        rows = production_lc_layouts(load_params(args.params), args.gpu_memory)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = Table(title=f"Production long-context layouts ({args.params}, {args.gpu_memory:.1f} GiB GPUs; estimates)")
    for column in ("sequence", "GPUs", "layout", "GiB/GPU", "fits", "nearest layouts that fit"):
        table.add_column(column)
    for r in rows:
        alternatives = "; ".join(f"{keys} ({gib:.1f} GiB)" for keys, gib in r["alternatives"])
        table.add_row(f"{r['seq_length']:,}", str(r["gpus"]), r["layout"], f"{r['gib']:.1f}",
                      "yes" if r["fits"] else "no", alternatives or "-")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()


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
