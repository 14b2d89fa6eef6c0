"""The Hugging Face side of a nano3 model: a `NemotronH` config from a preset.

One config builder serves the export (Megatron weights -> transformers), the CPU reference backend (which
trains transformers' NemotronH directly) and eval, so all three describe the same network.
"""

from __future__ import annotations

from nano3.megatron_compat import nemotron_h_classes
from nano3.model.presets import ModelPreset

LAYER_KINDS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
CPU_MAMBA_CHUNK = 32  # transformers' PyTorch Mamba path: the same result as chunk 128, a quarter of the work


def nemotron_h_config(preset: ModelPreset, vocab_size: int, eod_id: int, max_positions: int, dtype: str = "bfloat16"):
    """transformers' NemotronHConfig with the preset's shapes and the Nemotron 3 Nano conventions Megatron
    uses: squared-ReLU experts, sigmoid router with expert bias, normalised top-k scaled by the factor,
    no positional embeddings, untied output layer, RMSNorm eps 1e-5, Mamba conv 4 and chunk 128."""
    NemotronHConfig, _ = nemotron_h_classes()
    return NemotronHConfig(
        architectures=["NemotronHForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        layers_block_type=[LAYER_KINDS[c] for c in preset.hybrid_layer_pattern],
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups,
        head_dim=preset.kv_channels,
        intermediate_size=preset.ffn_hidden_size,
        mlp_hidden_act="relu2",
        mamba_num_heads=preset.mamba_num_heads,
        mamba_head_dim=preset.mamba_head_dim,
        ssm_state_size=preset.mamba_state_dim,
        n_groups=preset.mamba_num_groups,
        conv_kernel=4,
        chunk_size=128,
        n_routed_experts=preset.num_moe_experts,
        n_shared_experts=1,
        moe_intermediate_size=preset.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=preset.moe_shared_expert_intermediate_size,
        num_experts_per_tok=preset.moe_router_topk,
        routed_scaling_factor=preset.moe_router_topk_scaling_factor,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=False,
        initializer_range=preset.init_method_std,
        bos_token_id=None,
        eos_token_id=eod_id,
        pad_token_id=eod_id,
        dtype=dtype,
    )


def use_cpu_mamba_chunks(model) -> None:
    """Set the Mamba mixers' chunk size for the CPU (it changes the work, not the result)."""
    for layer in model.modules():
        if hasattr(layer, "chunk_size") and type(layer).__name__.endswith("Mixer"):
            layer.chunk_size = CPU_MAMBA_CHUNK


def gpu_device_map() -> str:
    """Where transformers puts a loaded model: straight onto the GPU (no host copy of the weights), its layers
    spread over every visible GPU when the job has several (a model larger than one GPU still loads)."""
    import torch

    return "auto" if torch.cuda.device_count() > 1 else "cuda"


def free_gpu_memory() -> None:
    """Give a released model's GPU memory back before the next one loads (export and eval hold one at a time)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


MOE_CHUNK_TOKENS = 8192  # tokens per pass through a MoE layer in a long forward (measured: bench/eval_memory.py)


def chunk_moe_tokens(model, tokens: int = MOE_CHUNK_TOKENS) -> None:
    """Run every MoE layer of a transformers NemotronH `tokens` positions at a time. Routing and experts act on
    each token alone, so the result is the same; but transformers' experts hold ~200 KB of buffers per token, 12 GiB
    for one 64k-token window, more than the headroom a 31.6B model leaves on an 80 GB GPU."""
    for layer in moe_layers(model):
        layer.forward = _chunked(layer.forward, tokens)


def moe_layers(model) -> list:
    """The MoE blocks of a transformers NemotronH (router, routed and shared experts)."""
    return [layer for layer in model.modules() if type(layer).__name__.endswith("MoE")]


def _chunked(forward, tokens: int):
    def run(hidden_states):
        step = max(1, tokens // hidden_states.shape[0])
        if hidden_states.shape[1] <= step:
            return forward(hidden_states)
        import torch

        return torch.cat([forward(part.contiguous()) for part in hidden_states.split(step, dim=1)], dim=1)

    return run


def steady_gpu_allocator() -> None:
    """Let PyTorch's allocator grow segments in place (expandable segments) before CUDA starts: a long forward's
    buffers of many sizes otherwise leave reserved memory at ~1.8x what is allocated (bench/eval_memory.py)."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
