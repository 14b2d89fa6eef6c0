"""`make smoke`: the whole pipeline on the embedded default, trained on whatever this machine has.

With a CUDA GPU, `dvc repro lc` runs every stage. Without one it
runs the data stages and the training stages' dry runs, and says plainly what it skipped and why.
Ends with a short summary of what ran: losses per phase and where the plots are.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from nano3.config import load_params
from nano3.train.plan import local_gpus


def dvc(*args: str) -> None:
    print(f"+ dvc {' '.join(args)}", flush=True)
    rc = subprocess.call(["dvc", *args])
    if rc:
        sys.exit(rc)


def read_metric(live_dir: Path, name: str) -> list[tuple[int, float]]:
    path = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return []
    with open(path) as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def summarize(params) -> None:
    from nano3.train.schedule import build_schedule

    sched = build_schedule(params)
    loss = read_metric(Path("dvclive/pretrain"), "train/loss")
    if loss:
        p1 = [v for s, v in loss if s <= sched.switch_iter]
        p2 = [v for s, v in loss if s > sched.switch_iter]
        print(f"pretrain: loss {p1[0]:.3f} -> {p1[-1]:.3f} in phase 1 (to iteration {sched.switch_iter})"
              + (f", {p2[0]:.3f} -> {p2[-1]:.3f} in phase 2" if p2 else ""))
    lc = read_metric(Path("dvclive/lc"), "train/loss")
    if lc:
        print(f"lc: loss {lc[0][1]:.3f} -> {lc[-1][1]:.3f} at sequence length {params.get_key('lc.seq_length')}")
    for stage in ("pretrain", "lc"):
        manifest = Path("checkpoints") / f"{stage}.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            print(f"{stage}: checkpoint {m['checkpoint']} at iteration {m['iteration']}")
    print("plots: dvc plots show (loss, LR, throughput, MoE load) and reports/blend/report.png")


def main() -> None:
    params = load_params(os.environ.get("NANO3_PARAMS", "params.yaml"))
    if local_gpus() > 0:
        dvc("repro", "lc")
        summarize(params)
        return
    dvc("repro", "blend")
    for stage in ("pretrain", "lc"):
        rc = subprocess.call([sys.executable, f"stages/{stage}.py", "--dry-run"])
        if rc:
            sys.exit(rc)
    print("\nsmoke: ran sample -> tokenizer -> prep -> blend and the pretrain/lc dry runs.\n"
          "smoke: SKIPPED pretrain and lc: no CUDA GPU on this machine, and training (Megatron-Bridge) needs one.\n"
          "smoke: run `make smoke` on a GPU machine (NANO3_SYSTEM_PYTHON=1 inside the NeMo container) to train.")


if __name__ == "__main__":
    main()
