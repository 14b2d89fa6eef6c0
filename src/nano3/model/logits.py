"""A transformers causal LM's logits a chunk of positions at a time (eval's losses, export's logits check): at a 131k
vocabulary one 64k-token window's fp32 logits take 34 GB, more than the headroom a 31.6B model leaves on an 80 GB
GPU. The decoder runs once; the output layer (and the loss) run on `chunk_tokens` positions at a time. A forward
pass that fits one chunk computes exactly (bit for bit) what `model(ids).logits` and one cross-entropy over it
would, so small models' reports do not change."""

from __future__ import annotations

from typing import Iterator


def input_device(model):
    """Where a model's input ids go (its embedding's device, also when its layers span several GPUs)."""
    return model.get_input_embeddings().weight.device


def hidden_states(model, ids):
    return model.model(input_ids=ids)[0]


def logit_chunks(model, ids, chunk_tokens: int) -> Iterator[tuple[int, object]]:
    """(first position, fp32 logits) for consecutive position ranges of ids, `chunk_tokens` tokens each."""
    import torch

    with torch.no_grad():
        hidden = hidden_states(model, ids)
        step = max(1, chunk_tokens // ids.shape[0])
        for start in range(0, hidden.shape[1], step):
            yield start, model.lm_head(hidden[:, start:start + step]).float()


def chunked_logits(model, ids, chunk_tokens: int) -> Iterator[tuple]:
    """(fp32 logits, next tokens) for consecutive position ranges of ids[:, :-1], `chunk_tokens` tokens each."""
    targets = ids[:, 1:]
    for start, logits in logit_chunks(model, ids[:, :-1], chunk_tokens):
        yield logits, targets[:, start:start + logits.shape[1]].to(logits.device)


def summed_loss(model, ids, chunk_tokens: int) -> float:
    """The next-token losses of a batch of windows, summed (nats)."""
    import torch.nn.functional as F

    return sum(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
               for logits, target in chunked_logits(model, ids, chunk_tokens))


def position_losses(model, ids, chunk_tokens: int):
    """The next-token loss at every position of one window (ids of shape [1, n]): n - 1 values on the host."""
    import numpy as np
    import torch.nn.functional as F

    return np.concatenate([F.cross_entropy(logits[0], target[0], reduction="none").cpu().numpy()
                           for logits, target in chunked_logits(model, ids, chunk_tokens)])


def answer_logits(model, ids, answer_tokens: int, chunk_tokens: int):
    """fp32 logits of the last `answer_tokens` positions of ids ([1, n]), made from the last chunk of the hidden
    states only (a pass-key answer is a few tokens at the end of a long prompt)."""
    import torch

    with torch.no_grad():
        hidden = hidden_states(model, ids)
        return model.lm_head(hidden[:, max(0, hidden.shape[1] - chunk_tokens):]).float()[0, -answer_tokens:]
