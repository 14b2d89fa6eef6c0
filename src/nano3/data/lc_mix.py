"""lc.mix: a share of lc's samples seen as independent short sequences, as the tech report mixes 4k sequences
among its 512k ones to keep short-context quality.

Nothing is truncated: a cut sample keeps all its tokens and targets, and attention and the Mamba state restart
at every `short_length` boundary. Both backends cut the same samples (`is_short`, by the phase's sample index, so
a resumed run cuts the same ones). On Megatron a cut sample carries packed-sequence (THD) metadata,
`cu_seqlens_q` and `max_seqlen_q`, which Megatron-Bridge's forward step turns into megatron-core's
`PackedSeqParams` (per-document attention, and the Mamba `seq_idx` that resets the state).
"""

from __future__ import annotations


def is_short(index: int, share: float) -> bool:
    """Whether lc's sample `index` is cut into short sequences: `share` of the samples, spread evenly."""
    return int((index + 1) * share) > int(index * share)


def short_boundaries(seq_length: int, short_length: int) -> dict:
    """The packed-sequence metadata of one sample cut into `seq_length / short_length` sequences."""
    import torch

    if seq_length % short_length:
        raise ValueError(f"short_length {short_length} does not divide the sample's {seq_length} tokens")
    return {"cu_seqlens_q": torch.arange(0, seq_length + 1, short_length, dtype=torch.int32),
            "max_seqlen_q": torch.tensor(short_length, dtype=torch.int32)}


class ShortSequenceMix:
    """A Megatron training dataset whose `share` of samples (by index) carry packed-sequence boundaries every
    `short_length` tokens; the others are returned as they are (ordinary causal sequences). Needs micro-batch 1:
    a packed (THD) batch is one sample."""

    def __init__(self, dataset, share: float, short_length: int):
        self.dataset, self.share, self.short_length = dataset, share, short_length

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        if not is_short(index, self.share):
            return sample
        return {**sample, **short_boundaries(len(sample["tokens"]), self.short_length)}
