"""Short-context quality after lc, with and without short sequences mixed in (issue 13, part 4).

    python bench/lc_mix.py [--tokens 65536] [--shares 0,0.5] [--eval-interval 8]          # CPU, reference backend
    python bench/lc_mix.py --backend megatron [--shares 0,0.5] [--short-length 512]       # GPU, packed sequences
        [--set lc.seq_length=65536 --set lc.global_batch_size=2 --set lc.tokens=8388608]  # any params override
        [--seeds 1234,1235]                                     # every share once per train.seed: the noise floor
    python bench/lc_mix.py --report bench/results/lc_mix/lc_mix_megatron.json              # print and plot a saved run

`--backend megatron` (a GPU machine with causal-conv1d, after the GPU `make smoke`): lc runs once per share with
params.yaml's lc budget (or `--set`'s) through Megatron (short sequences packed), then export and eval run on it in the same
scratch directory; printed per share: what lc ran (its packed micro-batches read back, throughput, last losses),
eval's loss by position of the lc model (its first bucket is the short-context loss) and eval's test loss of every
dataset in `eval.seq_length` windows (short context on the data the blends draw from), and the differences against
the first share, measured in the same run.

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
import statistics
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
           f"train.save_interval={10**9}", "train.log_interval=4", *args.set]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    (work / "lc.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: share {share}: lc failed; see {work / 'lc.log'}")
    live = work / "dvclive" / "lc"
    return {"share": share, "valid": read_metric(live, "valid/loss"), "valid_short": read_metric(live, "valid/loss_short")}


def run_share_megatron(share: float, seed: int | None, args, out: Path) -> dict:
    """lc, export and eval of one share on the GPU, in a scratch directory; eval's loss by position of the lc model.
    `seed` (train.seed: lc's data order) replicates the comparison; None keeps params.yaml's."""
    work = scratch(out / (f"megatron-share-{share:g}" + ("" if seed is None else f"-seed-{seed}")))
    mix = [f"lc.mix.short_share={share}", f"lc.mix.short_length={args.short_length}", "lc.micro_batch_size=1",
           "train.kernels.fused_mamba=true", "train.backend=megatron", *args.set,
           *([] if seed is None else [f"train.seed={seed}"])]
    for stage in ("lc", "export", "eval"):
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *mix], cwd=work,
                              capture_output=True, text=True)
        (work / f"{stage}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"error: share {share}: {stage} failed; see {work / f'{stage}.log'}")
    metrics = json.loads((work / "reports" / "eval" / "results.json").read_text())
    by_position = metrics["long_context"]["loss_by_position"]
    return {"share": share, "seed": seed, **what_lc_ran(work, share), "by_position": by_position["lc"],
            "pretrain_by_position": by_position["pretrain"],
            "test_loss": {name: m["loss"] for name, m in sorted(metrics["test"].items())}}


def what_lc_ran(work: Path, share: float) -> dict:
    """Read back from the lc run: the packed micro-batches Bridge's forward step built (rank 0's record), the
    throughput and the last losses. A share > 0 that packed nothing would compare two equal runs: refused."""
    run_dir = work / json.loads((work / "checkpoints" / "lc.json").read_text())["run_dir"]
    packed_file = run_dir / "packed.lc.json"
    packed = json.loads(packed_file.read_text()) if packed_file.exists() else None
    if share > 0 and not (packed and packed["micro_batches"] > 0):
        raise SystemExit(f"error: share {share}: lc built no packed micro-batch ({packed_file}: {packed}); "
                         f"see {work / 'lc.log'}")
    live = work / "dvclive" / "lc"
    speed = [v for step, v in read_metric(live, "perf/tokens_per_s_per_gpu") if step > 2]

    def last(metric: str) -> float:
        rows = read_metric(live, metric)
        return rows[-1][1] if rows else float("nan")

    return {"packed": packed, "tokens_per_s_per_gpu": statistics.median(speed) if speed else None,
            "train_loss": last("train/loss"), "valid_loss": last("valid/loss")}


def main_megatron(args, out: Path) -> None:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    results = []
    for seed in seeds:
        results += [run_share_megatron(float(s), seed, args, out) for s in args.shares.split(",")]
        (out / "lc_mix_megatron.json").write_text(json.dumps(results, indent=2))  # each seed's pair as it ends
    report_all(results, out / "lc_mix_megatron.png")


def report_all(results: list[dict], png: Path) -> None:
    """Every seed's comparison, the spread between seeds, and the plot (also from a saved JSON: --report)."""
    seeds = list(dict.fromkeys(r.get("seed") for r in results))
    for seed in seeds:
        report_megatron([r for r in results if r.get("seed") == seed])
    if len(seeds) > 1:
        report_spread(results, seeds)
    plot_megatron(results, png)
    print(f"plot: {png}")


def plot_megatron(results: list[dict], path: Path) -> None:
    """Loss by position after lc per share (the pretrain model dashed), and what lc changed in each bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nano3.files import atomic_save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    mids = [(b["from"] + b["to"]) / 2 for b in results[0]["by_position"]]
    width = (mids[1] - mids[0]) * 0.8 / len(results) if len(mids) > 1 else 10
    seed = results[0].get("seed")  # each seed's pair may come from a pretrain of its own: the first one's is drawn
    left.plot(mids, [b["loss"] for b in results[0]["pretrain_by_position"]], "k--",
              label="pretrain model" + ("" if seed is None else f" (seed {seed}'s run)"))
    for i, r in enumerate(results):
        name = f"share {r['share']:g}" + ("" if r.get("seed") is None else f", seed {r['seed']}")
        left.plot(mids, [b["loss"] for b in r["by_position"]], marker="o", label=f"after lc, {name}")
        change = [b["loss"] - p["loss"] for b, p in zip(r["by_position"], r["pretrain_by_position"])]
        right.bar([m + (i - (len(results) - 1) / 2) * width for m in mids], change, width=width, label=name)
    left.set(xlabel="position in the eval window (tokens)", ylabel="loss", title="Loss by position (eval)")
    right.set(xlabel="position in the eval window (tokens)", ylabel="lc model minus pretrain model",
              title="What lc changed (negative: better)")
    right.axhline(0, color="k", lw=0.5)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def first_bucket(r: dict) -> float:
    return r["by_position"][0]["loss"]


def report_spread(results: list[dict], seeds: list[int]) -> None:
    """Each share's first-bucket difference against the first share at every seed: an effect is the part that
    exceeds the spread between seeds."""
    by_seed = {seed: [r for r in results if r["seed"] == seed] for seed in seeds}
    for i, share in enumerate(r["share"] for r in by_seed[seeds[0]][1:]):
        diffs = [first_bucket(runs[i + 1]) - first_bucket(runs[0]) for runs in by_seed.values()]
        print(f"share {share:g} vs {by_seed[seeds[0]][0]['share']:g}, first bucket, by seed: "
              + ", ".join(f"{d:+.4f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.4f}, "
              f"spread {max(diffs) - min(diffs):.4f})")


def report_megatron(results: list[dict]) -> None:
    base = results[0]
    if base.get("seed") is not None:
        print(f"== train.seed {base['seed']}")
    for r in results:
        print(f"share {r['share']:g}: lc packed {r['packed']}, {r['tokens_per_s_per_gpu'] or 0:,.0f} tokens/s/GPU, "
              f"last train loss {r['train_loss']:.4f}, valid loss {r['valid_loss']:.4f}")
    print(f"{'share':>6} {'positions':>12} {'lc loss':>8} {'pretrain':>9}")
    for r in results:
        for bucket, before in zip(r["by_position"], r["pretrain_by_position"]):
            span = f"{bucket['from']}-{bucket['to']}"
            print(f"{r['share']:>6g} {span:>12} {bucket['loss']:>8.4f} {before['loss']:>9.4f}")
    for r in results[1:]:
        first = first_bucket(r) - first_bucket(base)
        mean = (sum(b["loss"] for b in r["by_position"]) - sum(b["loss"] for b in base["by_position"])) / len(
            r["by_position"])
        print(f"share {r['share']:g} vs {base['share']:g} after lc: first bucket (short context) {first:+.4f}, "
              f"mean over positions {mean:+.4f} (negative: better)")
        print(f"share {r['share']:g} vs {base['share']:g} after lc, test loss in eval.seq_length windows: " + ", ".join(
            f"{name} {loss - base['test_loss'][name]:+.4f}" for name, loss in r["test_loss"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="lc.reference.tokens of every run")
    ap.add_argument("--shares", default="0,0.5")
    ap.add_argument("--eval-interval", type=int, default=8)
    ap.add_argument("--out", default="bench/results/lc_mix")
    ap.add_argument("--backend", choices=["reference", "megatron"], default="reference")
    ap.add_argument("--short-length", type=int, default=512, help="--backend megatron: lc.mix.short_length")
    ap.add_argument("--seeds", default="", help="--backend megatron: train.seed values, each running every share")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml override for every share's stages (repeatable), e.g. lc.seq_length=65536")
    ap.add_argument("--report", metavar="JSON", help="print and plot a saved lc_mix_megatron.json, run nothing")
    args = ap.parse_args()
    if args.report:
        return report_all(json.loads(Path(args.report).read_text()), Path(args.report).with_suffix(".png"))
    if not (ROOT / "checkpoints" / "pretrain.json").exists():
        sys.exit("error: checkpoints/pretrain.json: missing; run make smoke first")
    out = ROOT / args.out
    if args.seeds and args.backend != "megatron":
        sys.exit("error: --seeds is for --backend megatron; the CPU comparison runs params.yaml's train.seed only")
    if args.backend == "megatron":
        return main_megatron(args, out)
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
