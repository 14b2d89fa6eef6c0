"""`make smoke`: the whole pipeline on the embedded default, trained on whatever this machine has.

`dvc repro eval` runs every stage: sample -> tokenizer -> prep -> blend -> pretrain (both phases) -> lc
-> export -> eval. Training runs on Megatron-Bridge where this machine has a CUDA GPU and on the CPU
reference backend (transformers, a smaller budget) elsewhere (`train.backend: auto`); the summary says
which. Ends with what ran: losses per phase, perplexities, and where the plots are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nano3.config import load_params
from nano3.train.metrics import read_metric


def dvc(*args: str) -> None:
    print(f"+ dvc {' '.join(args)}", flush=True)
    rc = subprocess.call(["dvc", *args])
    if rc:
        sys.exit(rc)


def summarize(params) -> None:
    from nano3.schedule import build_schedule
    from nano3.train.backends.training_run import for_backend

    manifests = {s: json.loads(p.read_text()) for s in ("pretrain", "lc")
                 if (p := Path("checkpoints") / f"{s}.json").exists()}
    backend = manifests.get("pretrain", {}).get("backend", "megatron")
    effective = for_backend(params, backend)
    sched = build_schedule(effective.settings)
    print(f"\nsmoke: trained with the {backend} backend"
          + (" (CPU: transformers' NemotronH, the train.reference / lc.reference budgets)" if backend == "reference" else ""))
    loss = read_metric(Path("dvclive/pretrain"), "train/loss")
    if loss:
        p1 = [v for s, v in loss if s <= sched.switch_iter]
        p2 = [v for s, v in loss if s > sched.switch_iter]
        print(f"pretrain: loss {p1[0]:.3f} -> {p1[-1]:.3f} in phase 1 (to iteration {sched.switch_iter})"
              + (f", {p2[0]:.3f} -> {p2[-1]:.3f} in phase 2" if p2 else ""))
    lc = read_metric(Path("dvclive/lc"), "train/loss")
    if lc:
        print(f"lc: loss {lc[0][1]:.3f} -> {lc[-1][1]:.3f} at sequence length {effective.settings.lc.seq_length}")
    for stage, m in manifests.items():
        print(f"{stage}: checkpoint {m['checkpoint']} at iteration {m['iteration']}")
    metrics = Path(params.settings.eval.out_dir) / "results.json"
    if metrics.exists():
        for name, r in json.loads(metrics.read_text())["test"].items():
            print(f"eval: {name} test perplexity {r['perplexity']:.2f}")
    print(f"model: {params.settings.export.out_dir} (transformers' AutoModelForCausalLM / AutoTokenizer)")
    print("plots: dvc plots show (loss, LR, throughput, MoE load) and reports/blend/report.png")


def main() -> None:
    params = load_params(os.environ.get("NANO3_PARAMS", "params.yaml"))
    dvc("repro", "eval")
    summarize(params)


if __name__ == "__main__":
    main()
