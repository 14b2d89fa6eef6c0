"""A Megatron checkpoint to a Hugging Face NemotronH directory through Megatron-Bridge's AutoBridge.

Runs where Megatron-Bridge and Transformer Engine are installed (a GPU machine or the NeMo container);
imported lazily. On a GPU the export checks itself: transformers' forward on the written directory
must give Megatron's next-token logits on held-out tokens (`compare_logits`). One model is on the GPU at a time
(Megatron's, then transformers'): at the real size (31.6B, 63 GB in BF16) two would not fit an 80 GB GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from nano3.errors import UserError
from nano3.megatron_compat import save_hf_model
from nano3.model.hf import free_gpu_memory
from nano3.model.logits import input_device, logit_chunks


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
    ids = None
    with temporary_distributed_context("nccl" if cuda else "gloo"):
        model = load_megatron_model(str(iter_dir), skip_temp_dist_context=True, use_cpu_init=not cuda)
        model = model if isinstance(model, list) else [model]
        vocab = unwrap(model[0]).embedding.word_embeddings.weight.shape[0]
        hf_config = config_for_vocab(vocab)
        save_hf_model(AutoBridge.from_hf_config(hf_config), model, out_dir, hf_config)
        if verify_windows is not None and cuda:
            ids = torch.as_tensor(verify_windows[:, :-1], dtype=torch.long, device="cuda")
            ours = megatron_logits(model[0], ids).cpu()  # host memory: the two models never share the GPU
        del model
    if ids is None:
        return {}
    free_gpu_memory()
    return compare_logits(ours, ids, out_dir)


def megatron_logits(model, ids):
    import torch

    model.eval()
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, attention_mask=None).float()


class LogitsDifference:
    """Running sums over chunks of positions: the comparison never holds two full sets of logits on the GPU."""

    ROWS = 256  # positions per float64 step: 256 MiB at a 131k vocabulary

    def __init__(self):
        self.diff_sq = self.ours_sq = self.abs_sum = self.ours_abs_sum = self.max_abs = 0.0
        self.agree = self.count = self.tokens = 0

    def add(self, ours, theirs) -> None:
        vocab = min(ours.shape[-1], theirs.shape[-1])
        ours, theirs = ours[..., :vocab].reshape(-1, vocab), theirs[..., :vocab].reshape(-1, vocab)
        for rows in range(0, ours.shape[0], self.ROWS):  # float64 temporaries of a few rows, not of the chunk
            self.add_rows(ours[rows:rows + self.ROWS], theirs[rows:rows + self.ROWS])

    def add_rows(self, ours, theirs) -> None:
        diff = (ours - theirs).double()
        gap = diff.abs()
        ours = ours.double()
        self.diff_sq += float(diff.square().sum())
        self.ours_sq += float(ours.square().sum())
        self.abs_sum += float(gap.sum())
        self.ours_abs_sum += float(ours.abs().sum())
        self.max_abs = max(self.max_abs, float(gap.max()))
        self.agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        self.count += diff.numel()
        self.tokens += diff.shape[0]

    def report(self) -> dict:
        return {
            "tokens": self.tokens,
            "rel_l2": (self.diff_sq / self.ours_sq) ** 0.5,
            "max_abs_diff": self.max_abs,
            "mean_abs_diff": self.abs_sum / self.count,
            "logit_abs_mean": self.ours_abs_sum / self.count,
            "top1_agreement": self.agree / self.tokens,
        }


def compare_logits(ours, ids, hf_dir: Path, chunk_tokens: int = 4096, device_map: str | None = None) -> dict:
    """Megatron's next-token logits `ours` (on the host) against transformers' on the exported directory, same
    tokens, BF16, compared `chunk_tokens` positions at a time.

    Both run BF16 weights and activations with different kernels (TE/fused vs PyTorch/mamba-ssm), so they
    agree to BF16 rounding accumulated over the layers, not bit for bit: the report gives the relative
    L2 error of the logits, the largest absolute difference and how often the argmax agrees.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from nano3.model.hf import chunk_moe_tokens, gpu_device_map

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16,
                                              device_map=device_map or gpu_device_map()).eval()
    chunk_moe_tokens(hf)
    difference = LogitsDifference()
    for start, theirs in logit_chunks(hf, ids.to(input_device(hf)), chunk_tokens):
        difference.add(ours[:, start:start + theirs.shape[1]].to(theirs.device), theirs)
    return difference.report()
