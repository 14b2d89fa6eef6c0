"""Parameter and FLOP counts for the hybrid Mamba-2 / attention / MoE model.

Training FLOPs per token are counted the way Megatron-Bridge's `num_floating_point_operations`
counts them (matmuls x 3 for forward + backward, causal attention core, logits), with one switch:
Bridge hard-codes the Mamba inner width as 2 x hidden (5376 for Nano), while the model's true inner
width is mamba_num_heads x mamba_head_dim (4096). `mamba_inner="true"` counts what the GPU computes;
`mamba_inner="bridge"` reproduces Bridge's number, so both TFLOP/s figures can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from nano3.config.sections import Mix
from nano3.model.presets import ModelPreset


def padded_vocab(vocab_size: int, preset: ModelPreset, tp: int = 1) -> int:
    multiple = preset.make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input embedding + output layer
    dense: int  # everything replicated across expert-parallel ranks (Mamba, attention, norms, shared experts, routers)
    experts: int  # routed experts, sharded by expert parallelism
    active: int  # parameters one token's forward pass multiplies with (the input embedding is a lookup)

    @property
    def total(self) -> int:
        return self.embedding + self.dense + self.experts


def mamba_inner(preset: ModelPreset, which: str = "true") -> int:
    return 2 * preset.hidden_size if which == "bridge" else preset.mamba_num_heads * preset.mamba_head_dim


def param_counts(preset: ModelPreset, vocab: int) -> ParamCounts:
    h = preset.hidden_size
    d_in, groups, state, heads = mamba_inner(preset), preset.mamba_num_groups, preset.mamba_state_dim, preset.mamba_num_heads
    conv_dim = d_in + 2 * groups * state
    mamba = h + h * (2 * d_in + 2 * groups * state + heads) + conv_dim * 4 + conv_dim + 3 * heads + d_in + d_in * h
    q, kv = preset.num_attention_heads * preset.kv_channels, preset.num_query_groups * preset.kv_channels
    attention = h + h * (q + 2 * kv) + q * h
    shared = 2 * h * preset.moe_shared_expert_intermediate_size
    router = h * preset.num_moe_experts + preset.num_moe_experts
    expert = 2 * h * preset.moe_ffn_hidden_size
    mlp = h + 2 * h * preset.ffn_hidden_size
    n_m, n_a, n_e, n_d = (preset.count(k) for k in "M*E-")
    dense = n_m * mamba + n_a * attention + n_e * (h + shared + router) + n_d * mlp + h  # + final norm
    experts = n_e * preset.num_moe_experts * expert
    embedding = 2 * vocab * h
    active = vocab * h + dense + n_e * preset.moe_router_topk * expert
    return ParamCounts(embedding, dense, experts, active)


def flops_per_token(preset: ModelPreset, seq_length: int, vocab: int, mamba_inner_width: str = "true") -> float:
    """Training FLOPs (forward + backward) per token."""
    h = preset.hidden_size
    d_in = mamba_inner(preset, mamba_inner_width)
    groups, state, heads = preset.mamba_num_groups, preset.mamba_state_dim, preset.mamba_num_heads
    mamba = 2 * h * (2 * d_in + 2 * groups * state + heads) + 7 * d_in * state + 2 * d_in * h
    q_width = preset.num_attention_heads * preset.kv_channels
    attention = 4 * h * preset.kv_channels * (preset.num_attention_heads + preset.num_query_groups) + 2 * seq_length * q_width
    moe = 4 * h * (preset.moe_ffn_hidden_size * preset.moe_router_topk + preset.moe_shared_expert_intermediate_size)
    mlp = 4 * h * preset.ffn_hidden_size
    n_m, n_a, n_e, n_d = (preset.count(k) for k in "M*E-")
    forward = n_m * mamba + n_a * attention + n_e * moe + n_d * mlp + 2 * h * vocab
    return 3.0 * forward


def mixed_flops_per_token(preset: ModelPreset, seq_length: int, vocab: int, mamba_inner_width: str = "true",
                          mix: Mix | None = None) -> float:
    """flops_per_token where lc.mix's `short_share` of the samples are packed sequences of `short_length` tokens:
    their attention spans only their own sequence."""
    long = flops_per_token(preset, seq_length, vocab, mamba_inner_width)
    if mix is None or not mix.short_share:
        return long
    short = flops_per_token(preset, mix.short_length, vocab, mamba_inner_width)
    return (1 - mix.short_share) * long + mix.short_share * short
