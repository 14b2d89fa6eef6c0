"""Training throughput of the real Nemotron 3 Nano widths at reduced depth, on one GPU (or at long context, two).

    python bench/train_throughput.py [--iters 30] [--variants baseline,fp8,...]
    python bench/train_throughput.py --scale long --lengths 4096,16384,65536,131072 --variants long,cp_a2a,cp_a2a_p2p

With `--lengths`, every variant runs at every length on the same GPUs and prints its TFLOP/s as a ratio of its
own at the first length (issue 13's goal: 64k with CP 2 at >= 0.6x the 4k figure). `--scale long` is 2 GPUs with
global batch 2, micro-batch 1: lengths from `--cp-from` on use context parallelism 2, shorter ones data
parallelism 2. Both TFLOP/s formulas count attention's quadratic term (model/flops.py).

Every variant trains the `nano3` preset's layers at full width (hidden 2688, GQA 32/2, Mamba 64x64,
state 128, expert FFN 1856, shared 3712, top-6, vocab 131072) with the pattern `MEM*E` and 64 experts
at sequence length 4096, through the same stage entry users run (stages/pretrain.py), on the sample
blend. Throughput is the median over iterations after `--warmup`, from the run's own dvclive metrics.
The first variant is the baseline (the untuned setting of ../shared/gpu's measurement: micro-batch 2,
alltoall dispatcher, no CUDA graphs); each later variant prints its ratio to it, measured in this run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nano3.train.metrics import read_metric  # noqa: E402

# The recipe's optimizer (LR 1e-4 -> 1e-5) with a short warm-up: at LR 1e-3 from step 1 the router collapsed
# onto 6 experts by step 2 (max/mean load = experts/top-k), which is not the natural routing to measure.
COMMON = [
    "model.preset=nano3", "model.vocab_size=131072", "train.phase2_start=1.0", "train.eval_interval=100000",
    "train.eval_iters=1", "train.save_interval=100000", "train.log_interval=1", "train.warmup_fraction=0.1",
    "train.lr=1e-4", "train.min_lr=1e-5", "train.backend=megatron",
]
# --scale: the model and GPUs of a run. `reduced` is one GPU; `half` and `full` are issue 6's measurements
# (the 52-layer model needs expert parallelism across a node).
SCALES = {
    "reduced": ['model.overrides={hybrid_layer_pattern: "MEM*E", num_moe_experts: 64}', "train.nodes=1",
                "train.gpus_per_node=1", "train.parallel.ep=1", "train.global_batch_size=16"],
    "half": ['model.overrides={hybrid_layer_pattern: "MEMEM*EMEMEM*EMEMEM*EMEMEM"}', "train.nodes=1",
             "train.gpus_per_node=4", "train.parallel.ep=4", "train.global_batch_size=32",
             "train.recompute_modules=[moe,layernorm]"],
    "full": ["train.nodes=1", "train.gpus_per_node=8", "train.parallel.ep=8", "train.global_batch_size=64",
             "train.recompute_modules=[moe,layernorm]"],
    # production's per-expert GEMM shapes on one GPU (issue 34): at EP 8 a GPU holds 16 of the 128 experts and gets
    # top-6 tokens from 8 GPUs, mbs x seq x 6 x 8 / 128 per expert; 16 experts top-6 on one GPU give the same
    "prod16": ['model.overrides={hybrid_layer_pattern: "MEM*E", num_moe_experts: 16}', "train.nodes=1",
               "train.gpus_per_node=1", "train.parallel.ep=1", "train.global_batch_size=16"],
    "long": ['model.overrides={hybrid_layer_pattern: "MEM*E", num_moe_experts: 64}', "train.nodes=1",
             "train.gpus_per_node=2", "train.parallel.ep=1", "train.global_batch_size=2"],
}
VARIANTS = {
    "baseline": ["train.micro_batch_size=2"],
    "mbs1": ["train.micro_batch_size=1"],
    "fp8_mbs1": ["train.micro_batch_size=1", "train.precision=fp8"],
    "mbs4": ["train.micro_batch_size=4"],
    "fp8": ["train.micro_batch_size=2", "train.precision=fp8"],
    "fp8_mbs4": ["train.micro_batch_size=4", "train.precision=fp8"],
    "cudagraphs": ["train.micro_batch_size=2", "train.kernels.cuda_graphs=transformer_engine"],
    "no_permute_fusion": ["train.micro_batch_size=2", "train.kernels.moe_permute_fusion=false"],
    # --scale prod16 (issue 34): configs/nano3.yaml's setting first (micro-batch 1, recompute moe + layernorm, BF16),
    # then one change at a time, then together. Bridge's FP8 recipes keep the first and last layer in BF16 (2 of a
    # 5-layer slice's 5, 2 of production's 52): `_all` quantizes them too, as NVIDIA's published benchmark does.
    "prod": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]"],
    "prod_mbs2": ["train.micro_batch_size=2", "train.recompute_modules=[moe,layernorm]"],
    "prod_mbs4": ["train.micro_batch_size=4", "train.recompute_modules=[moe,layernorm]"],
    "prod_mbs8": ["train.micro_batch_size=8", "train.recompute_modules=[moe,layernorm]"],
    "prod_fp8": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]", "train.precision=fp8",
                 "train.fp8_edge_layers_bf16=false"],
    "prod_fp8_delayed": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]",
                         "train.precision=fp8_delayed", "train.fp8_edge_layers_bf16=false"],
    "prod_fp8_block": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]",
                       "train.precision=fp8_blockwise", "train.fp8_edge_layers_bf16=false"],
    "prod_graphs": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]",
                    "train.kernels.cuda_graphs=transformer_engine", "bridge.model.cuda_graph_modules=[mamba,attn]"],
    "prod_router_fusion": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]",
                           "bridge.model.moe_router_fusion=true"],
    "prod_manual_gc": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]",
                       "bridge.train.manual_gc=true", "bridge.train.manual_gc_interval=100"],
    "prod_mbs4_fp8": ["train.micro_batch_size=4", "train.recompute_modules=[moe,layernorm]", "train.precision=fp8",
                      "train.fp8_edge_layers_bf16=false"],
    # ... and on top of micro-batch 4 without recompute (the best of the first H200 run: 325.8 TFLOP/s)
    "mbs8": ["train.micro_batch_size=8"],
    "mbs4_fp8": ["train.micro_batch_size=4", "train.precision=fp8", "train.fp8_edge_layers_bf16=false"],
    "mbs4_fp8_delayed": ["train.micro_batch_size=4", "train.precision=fp8_delayed", "train.fp8_edge_layers_bf16=false"],
    "mbs4_fp8_block": ["train.micro_batch_size=4", "train.precision=fp8_blockwise", "train.fp8_edge_layers_bf16=false"],
    "mbs4_graphs": ["train.micro_batch_size=4", "train.kernels.cuda_graphs=transformer_engine",
                    "bridge.model.cuda_graph_modules=[mamba,attn]"],
    "mbs4_router_fusion": ["train.micro_batch_size=4", "bridge.model.moe_router_fusion=true"],
    "mbs4_manual_gc": ["train.micro_batch_size=4", "bridge.train.manual_gc=true", "bridge.train.manual_gc_interval=100"],
    "prod_best": ["train.micro_batch_size=4", "train.recompute_modules=[moe,layernorm]", "train.precision=fp8",
                  "train.fp8_edge_layers_bf16=false", "bridge.model.moe_router_fusion=true",
                  "bridge.train.manual_gc=true", "bridge.train.manual_gc_interval=100"],
    # long context (--scale long): the CP communication and recompute settings issue 13 asks to tune
    "long": ["train.micro_batch_size=1"],
    "cp_p2p": ["train.micro_batch_size=1", "bridge.model.cp_comm_type=p2p"],
    "cp_a2a": ["train.micro_batch_size=1", "bridge.model.cp_comm_type=a2a"],
    # a2a+p2p (a2a inside a node, p2p across) needs hierarchical_context_parallel_sizes and CP >= 4: Bridge refuses
    # it without them, and on 2 GPUs it would be one of the two above
    "recompute_moe": ["train.micro_batch_size=1", "train.recompute_modules=[moe,layernorm]"],
    # the recipe's expandable-segment allocator (nano3.train.environment) against torch's default one
    "default_allocator": ["train.micro_batch_size=1", 'train.env={PYTORCH_CUDA_ALLOC_CONF: ""}'],
    # a 4k reference that fills the GPUs (micro-batch 4: 16k tokens per GPU per micro-batch, 32k at 64k with CP 2)
    "long_mbs4": ["train.micro_batch_size=4", "train.global_batch_size=8"],
    # ... and with the tokens per optimizer step of 64k at global batch 2 (131,072): the optimizer step and the
    # gradient reduction cost the same per step at every length, so a smaller 4k batch is charged more of them
    "long_mbs4_gbs32": ["train.micro_batch_size=4", "train.global_batch_size=32"],
}


def layout_for(scale: str, seq: int, cp_from: int, gpus_per_run: int = 2) -> list[str]:
    """`--scale long`: CP 2 from `cp_from` tokens on (DP 1), data parallelism 2 below it; on one GPU
    (`--gpus-per-run 1`) neither: the global batch of 2 is two accumulated micro-batches."""
    if scale != "long":
        return []
    cp = 2 if seq >= cp_from and gpus_per_run >= 2 else 1
    return [f"train.gpus_per_node={gpus_per_run}", f"train.parallel.cp={cp}"]


def planned_gib(overrides: list[str]) -> tuple[float, float]:
    """The plan's estimates for the same run: the tensors' peak and the allocator's reserved peak (issue 13)."""
    from nano3.config import load_params
    from nano3.train.plan import build_plan

    ours = [o for o in overrides if not o.startswith("bridge.")]
    memory = build_plan(load_params(ROOT / "params.yaml", ours), stages=("train",)).stages["train"].memory
    return memory.allocated_gib, memory.reserved_gib


def run_variant(name: str, overrides: list[str], iters: int, warmup: int, out_dir: Path, gpu: str | None = None,
                scale: str = "reduced", seq: int = 4096, cp_from: int = 65536, gpus_per_run: int = 2,
                seed: int | None = None, profile: bool = False) -> dict:
    live = out_dir / "live"
    ckpt = out_dir / "ckpt" / name
    gbs = int([o for o in [*SCALES[scale], *overrides] if o.startswith("train.global_batch_size=")][-1].split("=")[1])
    cmd = [sys.executable, "stages/pretrain.py", *COMMON, *SCALES[scale], *layout_for(scale, seq, cp_from, gpus_per_run),
           f"train.seq_length={seq}", *overrides, *([f"train.seed={seed}"] if seed is not None else []),
           *(profiled(iters) if profile else []),
           f"train.tokens={iters * gbs * seq}", f"train.live_dir={live / name}", f"train.checkpoint_dir={ckpt}"]
    plan_allocated_gib, plan_gib = planned_gib(cmd[2:])
    t0 = time.time()
    # one Triton cache for every variant: beside each variant's checkpoints (the stage's default) it went with them,
    # and every variant compiled mamba-ssm's kernels again (a site's own TRITON_CACHE_DIR wins)
    env = {"TRITON_CACHE_DIR": str(out_dir / "triton-cache"), **os.environ,
           **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    log_file = out_dir / f"{name}.log"
    rc, first_row_s = run_with_progress(cmd, env, log_file, ckpt, name, iters)
    runs = sorted(ckpt.glob("pretrain/*/live"))  # the run's own metrics: the stage is stopped before it publishes them
    rows = {key: read_metric(runs[-1], key) if runs else [] for key in (*METRICS, "train/loss")}
    traces = sorted(ckpt.glob("pretrain/*/torch_profile/rank-0.json*"))
    kernels = top_kernels(traces[-1]) if profile and traces else None
    shutil.rmtree(ckpt, ignore_errors=True)
    if rc != 0:
        return {"variant": name, "error": f"exit {rc}; see {log_file}"}
    metrics = {}
    for key in METRICS[:6]:
        values = [v for s, v in rows[key] if s > warmup]
        metrics[key.split("/")[1]] = statistics.median(values) if values else float("nan")
    for key in METRICS[6:]:  # peaks, from the first step on
        values = [v for _, v in rows[key]]
        metrics[key.split("/")[1]] = max(values) if values else float("nan")
    return {"variant": name, "seq": seq, "seed": seed, **metrics, "plan_allocated_gib": plan_allocated_gib,
            "plan_gib": plan_gib, "first_row_s": first_row_s, "seconds": round(time.time() - t0, 1),
            "loss": rows["train/loss"], **({"kernels": kernels} if kernels else {})}


def profiled(iters: int) -> list[str]:
    """Bridge's torch-profiler window over two iterations near the end (exported before the bench stops the run)."""
    return ["bridge.profiling.use_pytorch_profiler=true", f"bridge.profiling.profile_step_start={iters - 4}",
            f"bridge.profiling.profile_step_end={iters - 2}", "bridge.profiling.profile_ranks=[0]"]


DENSE_BF16_PEAK = 989.0  # TFLOP/s, H100 and H200 SXM (FACTS.md)

# Kernel families by name, for the profile summary (first match wins)
FAMILIES = (("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgrad", "dgrad")),
            ("attention", ("flash", "fmha", "attn")),
            ("Mamba scan/conv", ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "causal_conv",
                                 "ssd", "selective")),
            ("MoE permute/router", ("permut", "topk", "router", "moe", "sort", "scatter", "gather", "index")),
            ("FP8 cast/amax", ("cast", "amax", "quantiz", "fp8")),
            ("NCCL", ("nccl",)),
            ("norm", ("norm",)),
            ("memory", ("memcpy", "memset")))


def top_kernels(trace: Path, top: int = 15) -> dict:
    """GPU time by kernel name and by family in a chrome trace of torch's profiler: where the step's time goes."""
    import gzip

    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    by_name: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            by_name[e["name"]] = by_name.get(e["name"], 0.0) + float(e.get("dur", 0))
    total = sum(by_name.values()) or 1.0
    families: dict[str, float] = {}
    for name, us in by_name.items():
        low = name.lower()
        family = next((f for f, words in FAMILIES if any(w in low for w in words)), "other elementwise")
        families[family] = families.get(family, 0.0) + us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"gpu_ms": round(total / 1e3, 1),
            "families": {f: round(us / total, 4) for f, us in sorted(families.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:120], "ms": round(us / 1e3, 2), "share": round(us / total, 4)} for n, us in ranked]}


METRICS = ("perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu_true", "perf/tflops_per_gpu_bridge", "perf/max_memory_gib",
           "perf/max_memory_reserved_gib", "moe/max_over_mean_load", "perf/host_rank_peak_gib", "perf/host_pinned_gib")


def last_step(ckpt: Path) -> int:
    """The last iteration a variant's run has logged so far (a row being written is read on the next poll)."""
    try:
        return max((step for run in ckpt.glob("pretrain/*/live") for step, _ in read_metric(run, METRICS[0])), default=0)
    except (ValueError, KeyError):
        return 0


def run_with_progress(cmd: list[str], env: dict, log_file: Path, ckpt: Path, name: str,
                      iters: int) -> tuple[int, float | None]:
    """Run one variant with its output in `log_file`, echoing the stage's own lines (its start-up progress among
    them) and each logged iteration as it comes; returns the exit status and the seconds to the first logged row.
    Once the last iteration is logged the stage and its ranks are killed: their final checkpoint save (~50 s for the
    5-layer slice) is not what is measured, and the variant's checkpoints are deleted anyway."""
    import psutil

    t0, first_row, seen = time.time(), None, 0
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        while True:
            rc = proc.poll()
            text = log_file.read_text(errors="replace")
            for line in text[seen:].splitlines(keepends=True):
                if not line.endswith("\n") and rc is None:
                    break
                seen += len(line)
                if line.startswith(("pretrain:", "warning:")) or " iteration " in line and "/" in line:
                    print(f"[{name} {time.time() - t0:6.0f} s] {line.rstrip()[:220]}", flush=True)
            if first_row is None and any(ckpt.glob("pretrain/*/*/plots/metrics/**/*.tsv")):
                first_row = round(time.time() - t0, 1)
            if rc is not None:
                return rc, first_row
            if last_step(ckpt) >= iters:
                for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                proc.wait()
                print(f"[{name} {time.time() - t0:6.0f} s] iteration {iters} logged: stopped before the final save",
                      flush=True)
                return 0, first_row
            time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", default="baseline,fp8,mbs4,fp8_mbs4")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--gpus", default="0", help="GPUs to spread variants over, one variant per GPU at a time")
    ap.add_argument("--scale", choices=sorted(SCALES), default="reduced", help="reduced: 5 layers on 1 GPU; "
                    "half: 26 layers, EP 4 on 4 GPUs; full: 52 layers, EP 8 on 8 GPUs (use --gpus all); prod16: 5 layers with 16 "
                    "experts, production's per-expert GEMM shapes on 1 GPU (issue 34)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths: every variant at each")
    ap.add_argument("--cp-from", type=int, default=65536, help="--scale long: CP 2 from this length on")
    ap.add_argument("--gpus-per-run", type=int, choices=[1, 2], default=2,
                    help="--scale long: GPUs of one run (1: no CP, no DP; for a machine with one GPU)")
    ap.add_argument("--profile", default=None, metavar="VARIANT", help="afterwards, run VARIANT (or `best`: the "
                    "fastest of this run) once more under torch's profiler (two iterations near the end) and print GPU "
                    "time by kernel family and the top kernels (profile_<VARIANT>.json); its throughput is not reported")
    ap.add_argument("--seeds", default=None, help="comma-separated train.seed values: every variant at each, then "
                    "each variant's loss curve against the first variant's at the same seed, beside the first "
                    "variant's own seed-to-seed difference (a speed setting must not change the loss)")
    args = ap.parse_args()
    if args.lengths:
        return by_length(args)
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "data" / "blend" / "phase1.json").exists():  # the sample blend the variants train on
        subprocess.run(["dvc", "repro", "blend"], cwd=ROOT, check=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    names = args.variants.split(",")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    runs = [(n, seed) for seed in seeds for n in names]  # every variant at the first seed first
    gpus = args.gpus.split(",")
    queues = {g: runs[i::len(gpus)] for i, g in enumerate(gpus)}  # each GPU runs its variants one by one

    def key(name: str, seed: int | None) -> str:
        return name if seed in (None, seeds[0]) else f"{name}@{seed}"

    results: dict[str, dict] = {}

    def run_queue(gpu: str) -> None:
        visible = None if gpu == "all" else gpu
        for n, seed in queues[gpu]:
            k = key(n, seed)
            results[k] = run_variant(k, VARIANTS[n], args.iters, args.warmup, out_dir, visible, args.scale, args.seq,
                                     seed=seed)
            print_result(results[k], results.get(key(names[0], seed)), device)  # as each ends: a cut run keeps it
            (out_dir / "train_throughput.json").write_text(json.dumps(
                {"device": device, "results": [results[key(*r)] for r in runs if key(*r) in results]}, indent=2))

    with cf.ThreadPoolExecutor(len(gpus)) as pool:
        list(pool.map(run_queue, gpus))
    print("\nall variants (ratios to the first):", flush=True)
    for n, seed in runs:
        print_result(results[key(n, seed)], results[key(names[0], seed)], device)
    if len(seeds) > 1:
        loss_check(results, names, seeds, key, out_dir)
    if args.profile:
        name = fastest(results) if args.profile == "best" else args.profile
        r = run_variant(f"{name}-profile", VARIANTS[name], args.iters, args.warmup, out_dir,
                        None if gpus[0] == "all" else gpus[0], args.scale, args.seq, profile=True)
        print_profile(r, out_dir)


def fastest(results: dict) -> str:
    """The variant of this run with the highest Bridge TFLOP/s (a seed's repeat counts as its variant)."""
    done = [r for r in results.values() if "error" not in r]
    return max(done, key=lambda r: r["tflops_per_gpu_bridge"])["variant"].split("@")[0]


def print_profile(r: dict, out_dir: Path) -> None:
    if "kernels" not in r:
        print(f"profile {r['variant']}: no trace ({r.get('error', 'the profiler wrote none')})", flush=True)
        return
    k = r["kernels"]
    (out_dir / f"profile_{r['variant']}.json").write_text(json.dumps(k, indent=2))
    print(f"\nprofile {r['variant']}: {k['gpu_ms']:,.1f} ms of GPU kernels over the profiled iterations", flush=True)
    for family, share in k["families"].items():
        print(f"  {family:22s} {100 * share:5.1f}%", flush=True)
    gemm, rate = k["families"].get("GEMM", 0.0), r.get("tflops_per_gpu_true", float("nan"))
    if gemm:  # nearly all of the model's FLOPs are GEMMs: their rate is at most the step's rate over their share
        print(f"  the step runs at {rate:.0f} TFLOP/s (true count), {rate / DENSE_BF16_PEAK:.0%} of the BF16 peak; "
              f"its GEMMs at most {rate / gemm:.0f} TFLOP/s ({rate / gemm / DENSE_BF16_PEAK:.0%}) while they run",
              flush=True)
    for row in k["top"]:
        print(f"  {100 * row['share']:5.1f}%  {row['ms']:9.2f} ms  {row['kernel']}", flush=True)


def loss_check(results: dict, names: list[str], seeds: list[int], key, out_dir: Path) -> None:
    """Each variant's loss against the first variant's at the same seed (mean |difference| over the iterations both
    logged), beside the first variant's own difference between seeds: the run-to-run noise a speed setting must stay
    within. Writes loss_curves.png."""
    def curve(name: str, seed: int) -> dict[int, float]:
        return dict(results[key(name, seed)].get("loss", []))

    def mean_gap(a: dict, b: dict) -> float:
        steps = sorted(set(a) & set(b))
        return statistics.mean(abs(a[i] - b[i]) for i in steps) if steps else float("nan")

    base = names[0]
    noise = statistics.mean(mean_gap(curve(base, s), curve(base, t)) for s in seeds for t in seeds if s < t)
    print(f"\nloss: {base} seed to seed, mean |difference| {noise:.4f} (the run-to-run noise)", flush=True)
    for name in names[1:]:
        gap = statistics.mean(mean_gap(curve(name, s), curve(base, s)) for s in seeds)
        verdict = "within" if gap <= noise else "OUTSIDE"
        print(f"loss: {name:18s} vs {base} at the same seed, mean |difference| {gap:.4f}: {verdict} the noise",
              flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        for seed in seeds:
            steps, losses = zip(*sorted(curve(name, seed).items())) if curve(name, seed) else ((), ())
            ax.plot(steps, losses, label=f"{name} seed {seed}", linestyle="-" if seed == seeds[0] else "--")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.legend(fontsize=7)
    fig.savefig(out_dir / "loss_curves.png", dpi=120, bbox_inches="tight")


def print_result(r: dict, base: dict | None, device: str) -> None:
    name = r["variant"]
    if "error" in r:
        print(f"{name:18s} FAILED: {r['error']}", flush=True)
        return
    ratio = (f"x{r['tflops_per_gpu_bridge'] / base['tflops_per_gpu_bridge']:.2f} vs baseline"
             if base and "error" not in base else "baseline failed")
    print(f"{name:18s} {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  {r['tflops_per_gpu_bridge']:6.1f} TFLOP/s "
          f"(Bridge)  {r['tflops_per_gpu_true']:6.1f} (true)  {r['max_memory_gib']:5.1f} GiB peak "
          f"({r['max_memory_reserved_gib']:5.1f} reserved, plan {r['plan_gib']:5.1f})  "
          f"MoE max/mean load {r['max_over_mean_load']:4.2f}  first row at {r['first_row_s']} s  {ratio}  "
          f"[{device}]", flush=True)


def by_length(args) -> None:
    """Every variant at every length, one after another on the same GPUs; ratios to the variant's first length."""
    import torch

    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "data" / "blend" / "phase1.json").exists():
        subprocess.run(["dvc", "repro", "blend"], cwd=ROOT, check=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    visible = None if args.gpus in ("all", "0") and args.scale != "reduced" else args.gpus
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    for name in args.variants.split(","):
        first = None
        for seq in lengths:
            r = run_variant(f"{name}-{seq}", VARIANTS[name], args.iters, args.warmup, out_dir, visible, args.scale,
                            seq, args.cp_from, args.gpus_per_run)
            results.append(r)
            if "error" in r:
                print(f"{name:14s} {seq:>8,}  FAILED: {r['error']}", flush=True)
                continue
            first = first or r["tflops_per_gpu_true"]
            layout = " ".join(o.split(".")[-1] for o in layout_for(args.scale, seq, args.cp_from, args.gpus_per_run)) or "-"
            print(f"{name:14s} {seq:>8,}  {layout:20s} {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  "
                  f"{r['tflops_per_gpu_true']:6.1f} TFLOP/s (true)  {r['tflops_per_gpu_bridge']:6.1f} (Bridge)  "
                  f"{r['max_memory_gib']:5.1f} GiB allocated (plan x{r['plan_allocated_gib'] / r['max_memory_gib']:.2f}) "
                  f"{r['max_memory_reserved_gib']:5.1f} reserved (plan {r['plan_gib']:5.1f}, "
                  f"x{r['plan_gib'] / r['max_memory_reserved_gib']:.2f})  host {r['host_rank_peak_gib']:.1f} GiB/rank "
                  f"({r['host_pinned_gib']:.1f} pinned)  x{r['tflops_per_gpu_true'] / first:.2f} vs "
                  f"{lengths[0]:,}  [{device}]", flush=True)
    (out_dir / "lc_throughput.json").write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
