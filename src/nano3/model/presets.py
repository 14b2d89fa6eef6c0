"""Model presets: the architecture fields set on Megatron-Bridge's Nemotron 3 Nano model provider.

`nano3` is the published model (tech report Table 1, and Bridge's `nemotron_3_nano_pretrain_config`).
`tiny` keeps every layer kind and feature (Mamba-2 groups and state, GQA without positional
embeddings, routed + shared squared-ReLU experts, sigmoid router with expert bias and a sequence
aux loss) at small widths, so it fits one GPU, trains in a minute, and tests the same code paths.
Field names are Bridge's, so `model.overrides` in params.yaml can change any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from nano3.config.sections import ModelConfig
from nano3.errors import UserError

NANO3_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


@dataclass(frozen=True)
class ModelPreset:
    hybrid_layer_pattern: str  # M = Mamba-2, E = MoE, * = attention, - = dense MLP
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    mamba_num_heads: int
    mamba_head_dim: int
    mamba_state_dim: int
    mamba_num_groups: int
    num_moe_experts: int
    moe_router_topk: int
    moe_ffn_hidden_size: int
    moe_shared_expert_intermediate_size: int
    moe_router_topk_scaling_factor: float
    ffn_hidden_size: int
    moe_aux_loss_coeff: float = 1e-4
    make_vocab_size_divisible_by: int = 128
    # Set explicitly rather than inherited from Bridge's recipe, so the conformance check can hold the
    # live model to them: DeepSeek's aux-loss-free balancing (sigmoid scores + a per-expert bias moved
    # at this rate) with a small sequence aux loss, and the recipe's init std.
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_bias_update_rate: float = 1e-3
    moe_router_load_balancing_type: str = "seq_aux_loss"
    init_method_std: float = 0.0173

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_layer_pattern)

    def count(self, kind: str) -> int:
        return self.hybrid_layer_pattern.count(kind)

    def bridge_fields(self) -> dict:
        """Fields to set on Bridge's model provider (plus num_layers, which Bridge keeps separately)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["num_layers"] = self.num_layers
        return out


PRESETS = {
    "nano3": ModelPreset(
        hybrid_layer_pattern=NANO3_PATTERN, hidden_size=2688, num_attention_heads=32, num_query_groups=2,
        kv_channels=128, mamba_num_heads=64, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8,
        num_moe_experts=128, moe_router_topk=6, moe_ffn_hidden_size=1856, moe_shared_expert_intermediate_size=3712,
        moe_router_topk_scaling_factor=2.5, ffn_hidden_size=1856,
    ),
    "tiny": ModelPreset(
        hybrid_layer_pattern="MEM*EMEM*E", hidden_size=256, num_attention_heads=4, num_query_groups=2,
        kv_channels=64, mamba_num_heads=8, mamba_head_dim=64, mamba_state_dim=64, mamba_num_groups=2,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256, moe_shared_expert_intermediate_size=512,
        moe_router_topk_scaling_factor=2.5, ffn_hidden_size=256,
    ),
}


def model_preset(model: ModelConfig) -> ModelPreset:
    """The preset named by `model.preset`, with `model.overrides` applied and checked."""
    name = model.preset
    if name not in PRESETS:
        raise UserError(f"model.preset={name!r} is not one of {sorted(PRESETS)}")
    overrides = dict(model.overrides or {})
    known = {f.name for f in fields(ModelPreset)}
    preset_overrides = {k: v for k, v in overrides.items() if k in known}
    try:
        preset = replace(PRESETS[name], **preset_overrides)
    except TypeError as e:
        raise UserError(f"model.overrides: {e}") from None
    bad = set(preset.hybrid_layer_pattern) - set("ME*-")
    if bad:
        raise UserError(f"model: hybrid_layer_pattern has unknown layer symbols {sorted(bad)}; use M, E, *, -")
    return preset


def bridge_model_extras(model: ModelConfig) -> dict:
    """`model.overrides` keys that are not preset fields: passed to Bridge's provider as they are."""
    known = {f.name for f in fields(ModelPreset)} | {"num_layers"}
    return {k: v for k, v in (model.overrides or {}).items() if k not in known}
