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
                scale: str = "reduced", seq: int = 4096, cp_from: int = 65536, gpus_per_run: int = 2) -> dict:
    live = out_dir / "live"
    ckpt = out_dir / "ckpt" / name
    gbs = int([o for o in [*SCALES[scale], *overrides] if o.startswith("train.global_batch_size=")][-1].split("=")[1])
    cmd = [sys.executable, "stages/pretrain.py", *COMMON, *SCALES[scale], *layout_for(scale, seq, cp_from, gpus_per_run),
           f"train.seq_length={seq}", *overrides,
           f"train.tokens={iters * gbs * seq}", f"train.live_dir={live / name}", f"train.checkpoint_dir={ckpt}"]
    plan_allocated_gib, plan_gib = planned_gib(cmd[2:])
    t0 = time.time()
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    log_file = out_dir / f"{name}.log"
    log_file.write_text(proc.stdout + proc.stderr)
    shutil.rmtree(ckpt, ignore_errors=True)
    if proc.returncode != 0:
        return {"variant": name, "error": f"exit {proc.returncode}; see {log_file}"}
    metrics = {}
    for key in ("perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu_true", "perf/tflops_per_gpu_bridge",
                "perf/max_memory_gib", "perf/max_memory_reserved_gib", "moe/max_over_mean_load"):
        values = [v for s, v in read_metric(live / name / "pretrain", key) if s > warmup]
        metrics[key.split("/")[1]] = statistics.median(values) if values else float("nan")
    for key in ("perf/host_rank_peak_gib", "perf/host_pinned_gib"):  # peaks, from the first step on
        values = [v for _, v in read_metric(live / name / "pretrain", key)]
        metrics[key.split("/")[1]] = max(values) if values else float("nan")
    return {"variant": name, "seq": seq, **metrics, "plan_allocated_gib": plan_allocated_gib, "plan_gib": plan_gib,
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", default="baseline,fp8,mbs4,fp8_mbs4")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--gpus", default="0", help="GPUs to spread variants over, one variant per GPU at a time")
    ap.add_argument("--scale", choices=sorted(SCALES), default="reduced", help="reduced: 5 layers on 1 GPU; "
                    "half: 26 layers, EP 4 on 4 GPUs; full: 52 layers, EP 8 on 8 GPUs (use --gpus all)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths: every variant at each")
    ap.add_argument("--cp-from", type=int, default=65536, help="--scale long: CP 2 from this length on")
    ap.add_argument("--gpus-per-run", type=int, choices=[1, 2], default=2,
                    help="--scale long: GPUs of one run (1: no CP, no DP; for a machine with one GPU)")
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
    gpus = args.gpus.split(",")
    queues = {g: names[i::len(gpus)] for i, g in enumerate(gpus)}  # each GPU runs its variants one by one

    def run_queue(gpu: str) -> list[dict]:
        visible = None if gpu == "all" else gpu
        return [run_variant(n, VARIANTS[n], args.iters, args.warmup, out_dir, visible, args.scale, args.seq)
                for n in queues[gpu]]

    with cf.ThreadPoolExecutor(len(gpus)) as pool:
        done = {r["variant"]: r for rs in pool.map(run_queue, gpus) for r in rs}
    results = [done[n] for n in names]
    base = results[0].get("tflops_per_gpu_bridge")
    for r in results:
        name = r["variant"]
        if "error" in r:
            print(f"{name:18s} FAILED: {r['error']}", flush=True)
            continue
        print(f"{name:18s} {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  {r['tflops_per_gpu_bridge']:6.1f} TFLOP/s "
              f"(Bridge)  {r['tflops_per_gpu_true']:6.1f} (true)  {r['max_memory_gib']:5.1f} GiB peak "
              f"({r['max_memory_reserved_gib']:5.1f} reserved, plan {r['plan_gib']:5.1f})  "
              f"MoE max/mean load {r['max_over_mean_load']:4.2f}  "
              f"x{r['tflops_per_gpu_bridge'] / base:.2f} vs baseline  [{device}]", flush=True)
    (out_dir / "train_throughput.json").write_text(json.dumps({"device": device, "results": results}, indent=2))


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
