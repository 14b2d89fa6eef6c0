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
from pathlib import Path

import numpy as np

from nano3.data.retrieval import new_key, passkey_prompt
from nano3.data.splits import split_documents, split_stream
from nano3.errors import UserError
from nano3.files import atomic_save_figure


def retrieval_accuracy(model, haystack: np.ndarray, encode, lengths, prompts: int, seed: int) -> dict[str, dict]:
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    rng = random.Random(seed)
    out = {}
    for length in lengths:
        hits, losses, by_depth = 0, [], []
        span = max(1, len(haystack) - length)
        for i in range(prompts):
            depth = i / max(prompts - 1, 1)
            start = (i * span) // prompts  # each prompt its own stretch of the haystack
            ids, answer = passkey_prompt(haystack[start:].tolist(), encode, length, depth, new_key(rng))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:-1]], device=device)).logits[0, -len(answer):].float()
            target = torch.tensor(answer, device=device)
            hit = bool((logits.argmax(-1) == target).all())
            hits += hit
            losses.append(F.cross_entropy(logits, target).item())
            by_depth.append({"depth": round(depth, 3), "hit": hit})
        out[str(length)] = {"accuracy": hits / prompts, "answer_loss": float(np.mean(losses)), "prompts": prompts,
                            "by_depth": by_depth}
    return out


def loss_by_position(model, documents: list[np.ndarray], length: int, buckets: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    per_position = []
    for doc in documents:
        ids = torch.as_tensor(doc[: length + 1], device=device).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits.float()
        per_position.append(F.cross_entropy(logits[0], ids[0, 1:], reduction="none").cpu().numpy())
    mean = np.mean(per_position, axis=0)
    edges = np.linspace(0, length, buckets + 1).astype(int)
    return [{"from": int(a), "to": int(b), "loss": float(mean[a:b].mean())} for a, b in zip(edges[:-1], edges[1:])]


def evaluate(params, models: dict[str, tuple], log=print) -> dict:
    """Both measures for each of `models` (name -> (model, tokenizer)), on the same prompts and documents."""
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
    out = {"lengths": lengths, "documents": len(documents), "retrieval": {}, "loss_by_position": {}}
    for name, (model, tokenizer) in models.items():
        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        out["retrieval"][name] = retrieval_accuracy(model, haystack, encode, lengths, cfg.prompts,
                                                    params.settings.train.seed)
        out["loss_by_position"][name] = loss_by_position(model, documents, longest, cfg.buckets)
        accuracy = ", ".join(f"{k}: {v['accuracy']:.0%}" for k, v in out["retrieval"][name].items())
        curve = out["loss_by_position"][name]
        log(f"eval: {name}: pass-key retrieval {accuracy}; loss by position {curve[0]['loss']:.3f} (first "
            f"{curve[0]['to']} tokens) -> {curve[-1]['loss']:.3f} (last {curve[-1]['to'] - curve[-1]['from']})")
    return out


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
