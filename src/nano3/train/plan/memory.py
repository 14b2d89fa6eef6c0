"""The per-GPU and per-node host memory of a layout, estimated from the model's shapes (no GPU): what the plan checks
against the card and the node, and the nearest layouts that fit when it does not."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nano3.errors import UserError
from nano3.model.flops import param_counts
from nano3.model.presets import ModelPreset
from nano3.train.plan.layout import Layout, layout_errors

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 79.6  # an H100 80GB as CUDA reports it (81,559 MiB): the card a plan assumes by default


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


def kv_groups_hint(layout: Layout, preset: ModelPreset, vocab: int, recompute_moe: bool,
                   gpu_memory: tuple[float, str] | None, cross_entropy: str) -> str:
    """The nearest layouts with TP within the KV groups that fit the GPU (said where a stack cannot split a group)."""
    gpu_gib = gpu_memory[0] if gpu_memory else DEFAULT_GPU_MEMORY_GIB
    fits = fitting_layouts(layout, preset, vocab, recompute_moe, gpu_gib, cross_entropy=cross_entropy,
                           tp_above_kv_groups=False)
    return "; nearest layouts that build there and fit: " + ("; ".join(f"{k} ({g:.1f} GiB)" for k, g in fits)
                                                             or "none up to 4x the nodes")


def recomputes_moe(train) -> bool:
    """Whether selective recompute drops the MoE activations (train.recompute_modules), as the memory estimate counts."""
    return "moe" in (train.recompute_modules or [])
