"""Stage `eval`: the exported Hugging Face model, with transformers, on CPU or GPU.

Perplexity on the held-out test split of every dataset the blends draw from (token streams read
from the prepared bin/idx, so exactly the tokens training never saw), greedy continuations of
fixed prompts through the exported tokenizer (what a user loading the directory would get), and long
context before and after lc (eval/long_context.py: pass-key retrieval, loss by position).
"""

from __future__ import annotations

import math
from pathlib import Path

from nano3.config.clusters import local_gpu_memory
from nano3.data.splits import blend_datasets, split_stream, windows
from nano3.errors import UserError, brief
from nano3.eval import long_context
from nano3.export.footprint import check_stage
from nano3.extras import ensure_nemotron_h
from nano3.files import atomic_write_json, atomic_write_text, read_json
from nano3.model.hf import chunk_moe_tokens, free_gpu_memory, steady_gpu_allocator, use_cpu_mamba_chunks
from nano3.model.logits import input_device, summed_loss


def require_exported(model_dir: Path) -> None:
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: no exported model here (config.json missing); run the export stage "
                        f"(make export / dvc repro export)")


def load_exported(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nano3.model.hf import gpu_device_map

    require_exported(model_dir)
    cuda = torch.cuda.is_available()
    try:  # on a GPU straight onto it: no host copy of the weights
        model = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=gpu_device_map())
                 if cuda else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # a truncated or hand-edited directory fails deep inside transformers
        raise UserError(f"{model_dir}: the exported model does not load ({type(e).__name__}: {brief(e, 160)}); "
                        f"rerun the export stage (dvc repro -f export)") from None
    if cuda:
        chunk_moe_tokens(model)
    else:
        use_cpu_mamba_chunks(model)
    return model.eval(), tokenizer


def perplexity(model, batches, batch_size: int, chunk_tokens: int) -> tuple[float, int]:
    """Mean next-token loss (nats) over every window, and the number of predicted tokens."""
    import torch

    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        chunk = torch.as_tensor(batches[i:i + batch_size], dtype=torch.long, device=input_device(model))
        total += summed_loss(model, chunk, chunk_tokens)
        count += chunk[:, 1:].numel()
    return total / count, count


def continue_prompt(model, tokenizer, prompt: str, new_tokens: int) -> str:
    import torch

    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=input_device(model))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def eval_stage(params, log=print) -> dict:
    """Perplexity, continuations and long context of the exported model, then (after lc) long context of
    pretrain's export: one model on the GPU at a time (at 31.6B each takes 63 GB in BF16)."""
    cfg = params.settings
    model_dir = Path(cfg.export.out_dir)
    require_exported(model_dir)
    lineage = read_json(model_dir / "nano3_export.json", "export record (rerun the export stage)")
    source = lineage["source"]
    steady_gpu_allocator()
    check_stage(params, "eval", local_gpu_memory(), log=log)
    context_inputs = long_context.inputs(params)
    model, tokenizer = load_exported(model_dir)
    results = {}
    for name in blend_datasets(params):
        test = windows(split_stream(params, name, "test", cfg.eval.max_tokens + 1), cfg.eval.seq_length)
        loss, count = perplexity(model, test, cfg.eval.batch_size, cfg.eval.logits_chunk_tokens)
        results[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
        log(f"eval: {name}: perplexity {math.exp(loss):.2f} (loss {loss:.4f}) on {count:,} test tokens")
    samples = [{"prompt": p, "continuation": continue_prompt(model, tokenizer, p, cfg.eval.max_new_tokens)}
               for p in cfg.eval.prompts]
    measured = {source: long_context.measure(params, context_inputs, source, model, tokenizer, log)}
    del model
    free_gpu_memory()
    if source != "pretrain":  # the same measures before lc, listed first
        before, before_tokenizer = load_exported(Path(cfg.export.pretrain_dir))
        measured = {"pretrain": long_context.measure(params, context_inputs, "pretrain", before, before_tokenizer, log),
                    **measured}
        del before
        free_gpu_memory()
    out = Path(cfg.eval.out_dir)
    metrics = {"model": {"source": source, "iteration": lineage["iteration"], "format": lineage["format"]},
               "test": results, "long_context": long_context.combine(context_inputs, measured)}
    long_context.plot(metrics["long_context"], out / "long_context.png")
    atomic_write_json(out / "continuations.json", samples)
    atomic_write_text(out / "report.md", report(metrics, samples))
    atomic_write_json(out / "results.json", metrics)
    atomic_write_json(out / "metrics.json", headline(metrics))
    return metrics


def headline(results: dict) -> dict:
    """What `dvc exp show` lists (metrics.json): each dataset's test perplexity (columns ppl.<dataset>). The rest,
    pass-key retrieval and loss by position included, stays in results.json, report.md and long_context.png."""
    return {"ppl": {name: r["perplexity"] for name, r in results["test"].items()}}


def report(metrics: dict, samples: list[dict]) -> str:
    m = metrics["model"]
    lines = [f"# Evaluation of the exported model ({m['source']} iteration {m['iteration']}, from {m['format']})", "",
             "| dataset | test tokens | loss | perplexity |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.2f} |" for n, r in metrics["test"].items()]
    if "long_context" in metrics:
        lines += long_context.report_lines(metrics["long_context"])
    lines += ["", "## Greedy continuations", ""]
    for s in samples:
        lines += [f"**Prompt:** `{s['prompt']!r}`", "", "```", s["prompt"] + s["continuation"], "```", ""]
    return "\n".join(lines)


def run(params, args) -> dict:
    """Stage `eval`."""
    ensure_nemotron_h()  # as export: transformers' NemotronH loads the exported model
    metrics = eval_stage(params)
    out = params.settings.eval.out_dir
    print(f"eval: report {out}/report.md, results {out}/results.json (the headline in metrics.json)")
    return metrics
