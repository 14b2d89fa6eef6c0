"""Long context before and after lc: pass-key retrieval accuracy at several lengths, and the loss by position.

Retrieval (needle in a haystack): prompts of exactly each length in `eval.long_context.lengths`, built from the
test split of `haystack_dataset` (text no training saw) with the key at depths spread from 0 to 1; a prompt is
answered when the model's next-token argmax gives every token of the key after the question (teacher-forced, so
one forward pass per prompt). Loss by position: the next-token loss at each position of the longest length, over
the first long test documents of `documents_dataset`, averaged in `buckets` ranges: a model that uses its context
has a falling curve, one that lost it after a length a rising tail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nano3.data.retrieval import new_key, passkey_prompt
from nano3.data.splits import split_documents, split_stream
from nano3.errors import UserError
from nano3.files import atomic_save_figure
from nano3.model.logits import answer_logits, input_device, position_losses


def retrieval_accuracy(model, haystack: np.ndarray, encode, lengths, prompts: int, seed: int,
                       chunk_tokens: int) -> dict[str, dict]:
    import torch
    import torch.nn.functional as F

    device = input_device(model)
    rng = random.Random(seed)
    out = {}
    for length in lengths:
        hits, losses, by_depth = 0, [], []
        span = max(1, len(haystack) - length)
        for i in range(prompts):
            depth = i / max(prompts - 1, 1)
            start = (i * span) // prompts  # each prompt its own stretch of the haystack
            ids, answer = passkey_prompt(haystack[start:].tolist(), encode, length, depth, new_key(rng))
            logits = answer_logits(model, torch.tensor([ids[:-1]], device=device), len(answer), chunk_tokens)
            target = torch.tensor(answer, device=logits.device)
            hit = bool((logits.argmax(-1) == target).all())
            hits += hit
            losses.append(F.cross_entropy(logits, target).item())
            by_depth.append({"depth": round(depth, 3), "hit": hit})
        out[str(length)] = {"accuracy": hits / prompts, "answer_loss": float(np.mean(losses)), "prompts": prompts,
                            "by_depth": by_depth}
    return out


def loss_by_position(model, documents: list[np.ndarray], length: int, buckets: int, chunk_tokens: int) -> list[dict]:
    import torch

    per_position = []
    for doc in documents:
        ids = torch.as_tensor(doc[: length + 1], device=input_device(model)).unsqueeze(0)
        per_position.append(position_losses(model, ids, chunk_tokens))
    mean = np.mean(per_position, axis=0)
    edges = np.linspace(0, length, buckets + 1).astype(int)
    return [{"from": int(a), "to": int(b), "loss": float(mean[a:b].mean())} for a, b in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class Inputs:
    """The prompts' haystack and the long documents: read (and checked) once, before any model loads."""
    lengths: list[int]
    haystack: np.ndarray
    documents: list[np.ndarray]


def inputs(params) -> Inputs:
    cfg = params.settings.eval.long_context
    lengths = sorted(cfg.lengths)
    longest = lengths[-1]
    haystack = split_stream(params, cfg.haystack_dataset, "test", longest * cfg.prompts + 1)
    if len(haystack) < longest:
        raise UserError(f"{params.source}: eval.long_context.haystack_dataset={cfg.haystack_dataset!r} has "
                        f"{len(haystack):,} test tokens, fewer than the longest length {longest:,}; shorten "
                        f"eval.long_context.lengths or raise its test_fraction")
    documents = split_documents(params, cfg.documents_dataset, "test", longest + 1, cfg.documents)
    if not documents:
        raise UserError(f"{params.source}: eval.long_context.documents_dataset={cfg.documents_dataset!r} has no test "
                        f"document of {longest + 1:,} tokens or more; shorten eval.long_context.lengths or pick "
                        f"a dataset of longer documents")
    return Inputs(lengths, haystack, documents)


def measure(params, given: Inputs, name: str, model, tokenizer, log=print) -> dict:
    """Both measures for one model: {"retrieval": {length: ...}, "loss_by_position": [bucket, ...]}."""
    cfg = params.settings.eval.long_context
    chunk = params.settings.eval.logits_chunk_tokens

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    retrieval = retrieval_accuracy(model, given.haystack, encode, given.lengths, cfg.prompts,
                                   params.settings.train.seed, chunk)
    curve = loss_by_position(model, given.documents, given.lengths[-1], cfg.buckets, chunk)
    accuracy = ", ".join(f"{k}: {v['accuracy']:.0%}" for k, v in retrieval.items())
    log(f"eval: {name}: pass-key retrieval {accuracy}; loss by position {curve[0]['loss']:.3f} (first "
        f"{curve[0]['to']} tokens) -> {curve[-1]['loss']:.3f} (last {curve[-1]['to'] - curve[-1]['from']})")
    return {"retrieval": retrieval, "loss_by_position": curve}


def combine(given: Inputs, measured: dict[str, dict]) -> dict:
    """The models' measures side by side, in `measured`'s order (the report's columns)."""
    return {"lengths": given.lengths, "documents": len(given.documents),
            "retrieval": {name: m["retrieval"] for name, m in measured.items()},
            "loss_by_position": {name: m["loss_by_position"] for name, m in measured.items()}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in result["loss_by_position"].items():
        left.plot([(b["from"] + b["to"]) / 2 for b in curve], [b["loss"] for b in curve], marker="o", label=name)
    left.set(xlabel="position (tokens)", ylabel="next-token loss (nats)",
             title=f"Loss by position ({result['documents']} test documents)")
    for name, by_length in result["retrieval"].items():
        right.plot([int(k) for k in by_length], [v["accuracy"] for v in by_length.values()], marker="o", label=name)
    right.set(xlabel="prompt length (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05), title="Pass-key retrieval")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)


def report_lines(result: dict) -> list[str]:
    names = list(result["retrieval"])
    lines = ["", "## Long context (before and after lc)", "",
             "Pass-key retrieval accuracy (answer loss in nats):", "",
             "| length | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for length in result["retrieval"][names[0]]:
        cells = [f"{result['retrieval'][n][length]['accuracy']:.0%} ({result['retrieval'][n][length]['answer_loss']:.2f})"
                 for n in names]
        lines.append(f"| {int(length):,} | " + " | ".join(cells) + " |")
    lines += ["", f"Next-token loss by position over {result['documents']} test documents:", "",
              "| positions | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, bucket in enumerate(result["loss_by_position"][names[0]]):
        cells = [f"{result['loss_by_position'][n][i]['loss']:.3f}" for n in names]
        lines.append(f"| {bucket['from']}-{bucket['to']} | " + " | ".join(cells) + " |")
    lines += ["", "![long context](long_context.png)", ""]
    return lines
