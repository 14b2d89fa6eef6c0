"""A Megatron checkpoint to a Hugging Face NemotronH directory through Megatron-Bridge's AutoBridge.

Runs where Megatron-Bridge and Transformer Engine are installed (a GPU machine or the NeMo container);
imported lazily. On a GPU the export checks itself: transformers' forward on the written directory
must give Megatron's next-token logits on held-out tokens (`compare_logits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from nano3.errors import UserError
from nano3.megatron_compat import save_hf_model


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def export_megatron(iter_dir: Path, config_for_vocab: Callable, out_dir: Path, verify_windows=None) -> dict:
    """Load `iter_dir` on one GPU (tensor/pipeline/expert parallel folded to 1), write HF weights + config.

    `config_for_vocab(n)` builds the HF config for the checkpoint's (padded) embedding rows `n`.
    """
    import torch

    try:
        from megatron.bridge import AutoBridge
        from megatron.bridge.training.model_load_save import (
            load_megatron_model,
            temporary_distributed_context,
        )
    except ImportError as e:
        raise UserError(f"{iter_dir}: exporting a Megatron checkpoint needs Megatron-Bridge and Transformer Engine "
                        f"({e.name or e} is missing here); run the export stage in the NeMo container or on a GPU "
                        f"machine (CLUSTER=<profile> make export)") from None

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    with temporary_distributed_context("nccl" if cuda else "gloo"):
        model = load_megatron_model(str(iter_dir), skip_temp_dist_context=True, use_cpu_init=not cuda)
        model = model if isinstance(model, list) else [model]
        vocab = unwrap(model[0]).embedding.word_embeddings.weight.shape[0]
        hf_config = config_for_vocab(vocab)
        save_hf_model(AutoBridge.from_hf_config(hf_config), model, out_dir, hf_config)
        if verify_windows is None or not cuda:
            return {}
        return compare_logits(model[0], out_dir, verify_windows)


def megatron_logits(model, ids):
    import torch

    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, attention_mask=None).float()


def compare_logits(megatron_model, hf_dir: Path, windows) -> dict:
    """Next-token logits of Megatron's forward and of transformers on the exported directory, same tokens, BF16.

    Both run BF16 weights and activations with different kernels (TE/fused vs PyTorch/mamba-ssm), so they
    agree to BF16 rounding accumulated over the layers, not bit for bit: the report gives the relative
    L2 error of the logits, the largest absolute difference and how often the argmax agrees.
    """
    import torch
    from transformers import AutoModelForCausalLM

    megatron_model.eval()
    ids = torch.as_tensor(windows[:, :-1], dtype=torch.long, device="cuda")
    ours = megatron_logits(megatron_model, ids)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.float()
    vocab = min(ours.shape[-1], theirs.shape[-1])
    ours, theirs = ours[..., :vocab], theirs[..., :vocab]
    diff = ours - theirs
    return {
        "tokens": int(ids.numel()),
        "rel_l2": float(diff.norm() / ours.norm()),
        "max_abs_diff": float(diff.abs().max()),
        "mean_abs_diff": float(diff.abs().mean()),
        "logit_abs_mean": float(ours.abs().mean()),
        "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }
