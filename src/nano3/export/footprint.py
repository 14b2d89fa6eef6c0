"""GPU and host memory of the one-GPU stages (export, eval) for a model preset: the plan refuses, in one line, a
GPU or node that cannot hold them, before a job waits in a queue for it.

Both stages hold one BF16 copy of the model on the GPU at a time (export: Megatron's, then transformers'; eval: the
exported model, then pretrain's) and make fp32 logits a chunk of positions at a time, so the peak is the weights
plus a working set that does not grow with the model. The weights term is exact (the parameter count); the
working-set and host constants are first estimates, to be set from bench/full_depth.py's measured points on a GPU
(docs/benchmarks.md, "Export and eval at full depth").
"""

from __future__ import annotations

from dataclasses import dataclass

from nano3.errors import UserError
from nano3.model.flops import padded_vocab, param_counts
from nano3.model.presets import ModelPreset, model_preset
from nano3.model.vocab import model_vocab

GIB = 2**30
CONTEXT_GIB = 1.5  # CUDA context, cuBLAS/TE workspaces: what nvidia-smi shows beside the allocator (measured, plan.py)
EXPORT_BUFFERS_GIB = 2.0  # Bridge's conversion buffers and the checkpoint reader's, beside the weights
EVAL_BYTES_PER_TOKEN_LAYER = 64  # transient activations of transformers' forward (no grad), per token and layer
HOST_PROCESS_GIB = 6.0  # torch + CUDA + Megatron/transformers' Python in one process


@dataclass(frozen=True)
class Footprint:
    stage: str
    weights_gib: float  # one BF16 copy of the model
    working_gib: float  # logits chunks, activations, conversion buffers
    host_gib: float

    @property
    def gpu_gib(self) -> float:
        return self.weights_gib + self.working_gib + CONTEXT_GIB

    def describe(self) -> str:
        return (f"{self.stage}: {self.gpu_gib:.1f} GiB on the GPU (weights {self.weights_gib:.1f} + working "
                f"{self.working_gib:.1f} + CUDA context {CONTEXT_GIB:.1f}), {self.host_gib:.1f} GiB host")


def weights_gib(preset: ModelPreset, vocab: int) -> float:
    return param_counts(preset, padded_vocab(vocab, preset)).total * 2 / GIB


def export_footprint(preset: ModelPreset, vocab: int, verify_tokens: int, chunk_tokens: int) -> Footprint:
    """Megatron's model, its logits on the check's tokens (BF16 and fp32), then transformers' model beside those
    logits a chunk at a time; the check's logits wait on the host while the models swap."""
    vocab = padded_vocab(vocab, preset)
    logits = verify_tokens * vocab * 6 / GIB
    working = EXPORT_BUFFERS_GIB + max(logits, chunk_tokens * vocab * 14 / GIB)
    return Footprint("export", weights_gib(preset, vocab), working, HOST_PROCESS_GIB + verify_tokens * vocab * 4 / GIB)


def eval_footprint(preset: ModelPreset, vocab: int, longest_forward: int, chunk_tokens: int) -> Footprint:
    """The exported model, one forward pass of `longest_forward` tokens (no grad) and a chunk of fp32 logits with
    the cross-entropy's own copy."""
    vocab = padded_vocab(vocab, preset)
    activations = longest_forward * preset.num_layers * EVAL_BYTES_PER_TOKEN_LAYER / GIB
    working = activations + chunk_tokens * vocab * 14 / GIB
    return Footprint("eval", weights_gib(preset, vocab), working, HOST_PROCESS_GIB)


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
        raise UserError(f"{footprint.stage}: the plan estimates {footprint.gpu_gib:.1f} GiB on one GPU (weights "
                        f"{footprint.weights_gib:.1f} + working {footprint.working_gib:.1f} + context {CONTEXT_GIB}) "
                        f"but {gpu_source} has {gpu_gib:.1f} GiB; use a profile with larger GPUs (gpu_memory_gib), "
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
