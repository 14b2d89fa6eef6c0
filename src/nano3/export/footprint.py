"""GPU and host memory of the one-GPU stages (export, eval) for a model preset: the plan refuses, in one line, a
GPU or node that cannot hold them, before a job waits in a queue for it.

Both stages hold one BF16 copy of the model on the GPU at a time (export: Megatron's, then transformers'; eval: the
exported model, then pretrain's), make fp32 logits a chunk of positions at a time and run MoE layers a chunk of
tokens at a time, so the GPU peak is the weights plus a working set that does not grow with the model. The weights
term is exact (the parameter count); the others were measured on an H200 with the full 52-layer depth, real widths
and vocabulary (bench/full_depth.py, bench/eval_memory.py; docs/benchmarks.md, "Export and eval at full depth").
"""

from __future__ import annotations

from dataclasses import dataclass

from nano3.errors import UserError
from nano3.model.flops import padded_vocab, param_counts
from nano3.model.presets import ModelPreset, model_preset
from nano3.model.vocab import model_vocab

GIB = 2**30
LOGITS_BYTES = 10  # per position and vocabulary entry of a logits chunk: BF16 output, fp32 copy, fp32 loss/compare
EVAL_BYTES_PER_TOKEN_HIDDEN = 45  # the longest forward's transients (a Mamba layer's scan), per token and hidden unit
EXPORT_OVERHEAD_GIB = 2.3  # what nvidia-smi counts beyond the allocator's peak: CUDA context, TE/cuBLAS workspaces
EVAL_OVERHEAD_GIB = 4.5  # the same for eval: context, Triton (mamba-ssm) and cuBLAS workspaces
EXPORT_HOST_GIB, EXPORT_HOST_PER_WEIGHT = 9.0, 1.78  # the process, plus host copies while converting and loading
EVAL_HOST_GIB, EVAL_HOST_PER_WEIGHT = 0.8, 1.0  # the process, plus the safetensors pages transformers maps


@dataclass(frozen=True)
class Footprint:
    stage: str
    weights_gib: float  # one BF16 copy of the model
    working_gib: float  # logits chunks, activations, comparison buffers: the allocator's peak beyond the weights
    overhead_gib: float  # CUDA context and library workspaces
    host_gib: float

    @property
    def gpu_gib(self) -> float:
        return self.weights_gib + self.working_gib + self.overhead_gib

    def gpu_terms(self) -> str:
        return f"weights {self.weights_gib:.1f} + working {self.working_gib:.1f} + context {self.overhead_gib:.1f}"

    def describe(self) -> str:
        return f"{self.stage}: {self.gpu_gib:.1f} GiB on the GPU ({self.gpu_terms()}), {self.host_gib:.1f} GiB host"


def weights_gib(preset: ModelPreset, vocab: int) -> float:
    return param_counts(preset, padded_vocab(vocab, preset)).total * 2 / GIB


def export_footprint(preset: ModelPreset, vocab: int, verify_tokens: int, chunk_tokens: int) -> Footprint:
    """Megatron's model and its logits on the check's tokens (BF16 and fp32), then transformers' model beside a
    chunk of both models' logits; the check's logits wait on the host while the models swap."""
    vocab = padded_vocab(vocab, preset)
    weights = weights_gib(preset, vocab)
    working = max(verify_tokens * vocab * 6, min(chunk_tokens, verify_tokens) * vocab * LOGITS_BYTES) / GIB
    return Footprint("export", weights, working, EXPORT_OVERHEAD_GIB,
                     EXPORT_HOST_GIB + EXPORT_HOST_PER_WEIGHT * weights)


def eval_footprint(preset: ModelPreset, vocab: int, longest_forward: int, chunk_tokens: int) -> Footprint:
    """The exported model, one forward pass of `longest_forward` tokens (no grad: one layer's transients at a time)
    or a chunk of fp32 logits with the loss's own copy, whichever is larger."""
    vocab = padded_vocab(vocab, preset)
    weights = weights_gib(preset, vocab)
    working = max(longest_forward * preset.hidden_size * EVAL_BYTES_PER_TOKEN_HIDDEN,
                  chunk_tokens * vocab * LOGITS_BYTES) / GIB
    return Footprint("eval", weights, working, EVAL_OVERHEAD_GIB, EVAL_HOST_GIB + EVAL_HOST_PER_WEIGHT * weights)


def footprints(params, vocab: int) -> dict[str, Footprint]:
    """Export's and eval's footprints for these params (the model preset, the check's and eval's lengths)."""
    settings = params.settings
    preset = model_preset(settings.model)
    chunk = settings.eval.logits_chunk_tokens
    longest = max(settings.eval.batch_size * settings.eval.seq_length, *settings.eval.long_context.lengths)
    return {"export": export_footprint(preset, vocab, settings.export.verify_tokens, chunk),
            "eval": eval_footprint(preset, vocab, longest, chunk)}


def check_fits(footprint: Footprint, gpu_gib: float, gpu_source: str, host_gib: float | None = None,
               host_source: str = "") -> None:
    """One line, before anything runs, when one GPU (or the node's memory) cannot hold the stage."""
    if footprint.gpu_gib > gpu_gib:
        raise UserError(f"{footprint.stage}: the plan estimates {footprint.gpu_gib:.1f} GiB on one GPU "
                        f"({footprint.gpu_terms()}) but {gpu_source} has {gpu_gib:.1f} GiB; use a profile with larger GPUs (gpu_memory_gib), "
                        f"or lower eval.logits_chunk_tokens / eval.long_context.lengths / export.verify_tokens")
    if host_gib is not None and footprint.host_gib > host_gib:
        raise UserError(f"{footprint.stage}: the plan estimates {footprint.host_gib:.1f} GiB of host memory but "
                        f"{host_source} has {host_gib:.0f} GiB; use a node with more memory (host_memory_gib)")


def known_vocab(params) -> int | None:
    """The model's vocabulary where it is known yet (model.vocab_size, or a made or sized tokenizer), else None."""
    try:
        return model_vocab(params)
    except UserError:
        return None


def check_stage(params, stage: str, gpu: tuple[float, str] | None, host: tuple[float, str] | None = None,
                log=None) -> None:
    """The stage's footprint against a GPU (and node) of the profile or of this machine; nothing to check on a
    CPU or before the vocabulary is known (a chain submitted before its tokenizer job: the stage checks at start)."""
    vocab = known_vocab(params)
    if gpu is None or vocab is None:
        return
    footprint = footprints(params, vocab)[stage]
    check_fits(footprint, *gpu, *(host or (None, "")))
    if log:
        log(f"{footprint.describe()} (plan estimate; {gpu[1]} has {gpu[0]:.1f} GiB)")
