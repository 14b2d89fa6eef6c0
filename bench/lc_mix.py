"""Short-context quality after lc, with and without short sequences mixed in (issue 13, part 4), on the CPU.

    python bench/lc_mix.py [--tokens 65536] [--shares 0,0.5] [--eval-interval 8]

From the embedded pipeline's pretrain checkpoint (run `make smoke` first), lc runs once per share on the CPU
reference backend, each in a scratch directory (the same data, pretrain checkpoint, seed and token budget; only
`lc.mix.short_share` differs). Printed per share: the validation loss at lc's length (`lc.reference.seq_length`)
and the short-context validation loss (the same validation tokens cut into `lc.mix.short_length` sequences) at
each validation, and the final difference against the first share, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nano3.train.metrics import read_metric  # noqa: E402


def scratch(out: Path) -> Path:
    """A directory that sees the repository's data and pretrain checkpoint but keeps its own lc run."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoints").mkdir(parents=True)
    (out / "data").symlink_to(ROOT / "data")
    (out / "checkpoints" / "pretrain").symlink_to(ROOT / "checkpoints" / "pretrain")
    shutil.copy(ROOT / "checkpoints" / "pretrain.json", out / "checkpoints" / "pretrain.json")
    shutil.copy(ROOT / "params.yaml", out / "params.yaml")
    return out


def run_share(share: float, args, out: Path) -> dict:
    work = scratch(out / f"share-{share:g}")
    cmd = [sys.executable, str(ROOT / "stages" / "lc.py"), "train.backend=reference", f"lc.mix.short_share={share}",
           f"lc.reference.tokens={args.tokens}", f"train.eval_interval={args.eval_interval}", "train.eval_iters=4",
           f"train.save_interval={10**9}", "train.log_interval=4"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    (work / "lc.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: share {share}: lc failed; see {work / 'lc.log'}")
    live = work / "dvclive" / "lc"
    return {"share": share, "valid": read_metric(live, "valid/loss"), "valid_short": read_metric(live, "valid/loss_short")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="lc.reference.tokens of every run")
    ap.add_argument("--shares", default="0,0.5")
    ap.add_argument("--eval-interval", type=int, default=8)
    ap.add_argument("--out", default="bench/results/lc_mix")
    args = ap.parse_args()
    if not (ROOT / "checkpoints" / "pretrain.json").exists():
        sys.exit("error: checkpoints/pretrain.json: missing; run make smoke first")
    out = ROOT / args.out
    results = [run_share(float(s), args, out) for s in args.shares.split(",")]
    base = results[0]
    print(f"{'share':>6} {'step':>5} {'valid loss':>11} {'short-context':>14}")
    for r in results:
        for (step, long), (_, short) in zip(r["valid"], r["valid_short"]):
            print(f"{r['share']:>6g} {step:>5} {long:>11.4f} {short:>14.4f}")
    for r in results[1:]:
        d_long = r["valid"][-1][1] - base["valid"][-1][1]
        d_short = r["valid_short"][-1][1] - base["valid_short"][-1][1]
        print(f"share {r['share']:g} vs {base['share']:g} after lc: valid loss {d_long:+.4f}, short-context {d_short:+.4f} "
              f"(negative: better)")
    (out / "lc_mix.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
