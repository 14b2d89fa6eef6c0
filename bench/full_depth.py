"""Export and eval of the full-depth Nano 3 (52 layers, real widths, 131k vocabulary) on one GPU: measured peaks
beside the plan's estimates (nano3/export/footprint.py), and its estimate for the full 128 experts.

    python bench/full_depth.py [--experts 8,32] [--work /tmp/full-depth] [--json out.json]

For each expert count: a randomly initialised model (Megatron-Bridge's provider for the nano3 preset's HF config,
built on the GPU) saved as a Megatron checkpoint without optimizer state, as a manifest of `pretrain` names it; then
the real stage scripts on it: `stages/export.py` (HF weights, then the logits check: Megatron's model, then
transformers') and `stages/eval.py` (test perplexity at 4k, continuations, pass-key retrieval and loss by position
at 4k and 64k tokens). Each runs as its own process while this script samples the GPU's used memory (nvidia-smi:
what the 80 GB limit counts, CUDA context included) and the process tree's resident memory every 0.2 s.

The 31.6B model (128 experts) needs 63 GB per copy: its Megatron checkpoint and HF directory do not fit beside each
other on a 64 GiB disk, so the measured points have fewer experts and the full model is the plan's estimate, whose
weight term is the exact parameter count. Needs a GPU with Megatron-Bridge, TE and mamba-ssm, and the test splits
in data/fulldepth/prepared (`python bench/full_depth.py --data-only` on any machine after `make blend`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA = ROOT / "data" / "fulldepth" / "prepared"
VOCAB = 131072
LENGTHS = (4096, 65536)


def overrides(experts: int, work: Path) -> list[str]:
    """The stages' params: the nano3 preset with `experts` experts, the bench's data and lengths, outputs in work."""
    return ["model.preset=nano3", f"model.overrides.num_moe_experts={experts}", f"model.vocab_size={VOCAB}",
            f"train.checkpoint_dir={work}/checkpoints", "train.seq_length=4096", f"prep.out_dir={DATA}",
            "export.source=pretrain", f"export.out_dir={work}/hf", f"export.pretrain_dir={work}/hf-pretrain",
            f"export.report={work}/export.json", "export.verify_tokens=4096", "export.max_rel_l2=0.5",
            f"eval.out_dir={work}/eval", "eval.seq_length=4096", "eval.max_tokens=16384", "eval.batch_size=4",
            f"eval.long_context.lengths=[{','.join(map(str, LENGTHS))}]", "eval.long_context.prompts=2",
            "eval.long_context.haystack_dataset=stdlib-long", "eval.long_context.documents_dataset=stdlib-long",
            "eval.long_context.documents=2", "eval.long_context.buckets=16", "eval.max_new_tokens=16"]


def make_data() -> None:
    """Test splits only, with stdlib-long re-split so that most of its modules are test documents: the longest
    (up to 205k tokens) give loss by position at 64k, which the default 2% test split cannot."""
    if (DATA / "stdlib-long" / "manifest.json").exists():
        return
    staging = DATA.parent / "staging"
    subprocess.run([sys.executable, str(ROOT / "stages" / "prep.py"), "stdlib-long", f"prep.out_dir={staging}",
                    f"prep.shards_dir={staging / 'shards'}", f"prep.work_dir={DATA.parent / 'work'}",
                    "datasets.stdlib-long.test_fraction=0.9"], check=True, cwd=ROOT)
    for source in [ROOT / "data" / "prepared" / name for name in ("stdlib-code", "stdlib-docs", "retrieval")] + \
            [staging / "stdlib-long"]:
        manifest = json.loads((source / "manifest.json").read_text())
        shards = DATA.parent / "shards" / source.name  # the test split's shards only: what eval reads
        for shard in manifest["splits"]["test"]["shards"]:
            for suffix in (".bin", ".idx"):
                path = shards / (shard["prefix"] + suffix)
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f"{manifest['shards_dir']}/{shard['prefix']}{suffix}", path)
        (DATA / source.name).mkdir(parents=True, exist_ok=True)
        (DATA / source.name / "manifest.json").write_text(
            json.dumps({**manifest, "shards_dir": str(shards.relative_to(ROOT))}))
    shutil.rmtree(staging)
    shutil.rmtree(DATA.parent / "work", ignore_errors=True)


def build_checkpoint(experts: int, work: Path) -> None:
    """A random model of the preset on the GPU, saved by Bridge without optimizer state, and pretrain's manifest."""
    import torch
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import save_megatron_model, temporary_distributed_context
    from megatron.core.transformer.enums import AttnBackend

    from nano3.config import load_params
    from nano3.data.tokenizers import read_info
    from nano3.model.hf import nemotron_h_config
    from nano3.model.presets import model_preset

    params = load_params(str(ROOT / "params.yaml"), overrides(experts, work))
    hf_config = nemotron_h_config(model_preset(params.settings.model), VOCAB,
                                  read_info(params.settings.tokenizer.dir).eod_id, max(LENGTHS))
    run = work / "checkpoints" / "pretrain" / f"random-{experts}-experts"
    torch.cuda.set_device(0)
    with temporary_distributed_context("nccl"):
        provider = AutoBridge.from_hf_config(hf_config).to_megatron_provider(load_weights=False)
        provider.gradient_accumulation_fusion = False  # APEX's fused kernel: absent outside the NeMo container
        provider.attention_backend = AttnBackend.auto  # the bridge asks for flash-attn, which TE here lacks
        provider.finalize()
        model = provider.provide_distributed_model(wrap_with_ddp=False)
        save_megatron_model(model, run)
    iteration = int((run / "latest_checkpointed_iteration.txt").read_text().strip())
    (work / "checkpoints" / "pretrain.json").write_text(json.dumps({
        "stage": "pretrain", "checkpoint": str(run), "iteration": iteration, "digest": f"random-{experts}",
        "format": "megatron", "code": None}))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(next(line for line in open(f"/proc/{p}/status") if line.startswith("VmRSS")).split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (OSError, StopIteration):
            pass
    return total


def gpu_used_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0]) * 2**20


def measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd` (output to `log`), sampling the GPU's used memory and the process tree's RSS; its peaks and time."""
    baseline = gpu_used_bytes()
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peaks = {"gpu": 0, "host": 0}

        def sample():
            while proc.poll() is None:
                peaks["gpu"] = max(peaks["gpu"], gpu_used_bytes() - baseline)
                peaks["host"] = max(peaks["host"], tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {rc}); its log: {log}\n{log.read_text()[-4000:]}")
    return {"gpu_peak_gib": peaks["gpu"] / 2**30, "host_peak_gib": peaks["host"] / 2**30,
            "seconds": time.time() - start}


def estimates(experts: int, work: Path) -> dict:
    from nano3.config import load_params
    from nano3.export.footprint import footprints

    params = load_params(str(ROOT / "params.yaml"), overrides(experts, work))
    return {stage: {"gpu_gib": f.gpu_gib, "host_gib": f.host_gib, "weights_gib": f.weights_gib}
            for stage, f in footprints(params, VOCAB).items()}


def one_point(experts: int, work: Path) -> dict:
    """Build, export and eval with `experts` experts; their peaks, times and the plan's estimates."""
    from nano3.config import load_params
    from nano3.model.flops import param_counts
    from nano3.model.presets import model_preset

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = load_params(str(ROOT / "params.yaml"), overrides(experts, work))
    point = {"experts": experts, "params_b": param_counts(model_preset(params.settings.model), VOCAB).total / 1e9,
             "estimate": estimates(experts, work)}
    print(f"== {experts} experts: {point['params_b']:.2f}B parameters", flush=True)
    point["build"] = measured([sys.executable, __file__, "--build", str(experts), "--work", str(work)],
                              work / "build.log")
    print(f"   checkpoint built and saved in {point['build']['seconds']:.0f} s", flush=True)
    for stage in ("export", "eval"):
        point[stage] = measured([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *overrides(experts, work)],
                                work / f"{stage}.log")
        est = point["estimate"][stage]
        print(f"   {stage}: GPU peak {point[stage]['gpu_peak_gib']:.1f} GiB (estimate {est['gpu_gib']:.1f}), host "
              f"{point[stage]['host_peak_gib']:.1f} GiB (estimate {est['host_gib']:.1f}), "
              f"{point[stage]['seconds']:.0f} s", flush=True)
    point["logits_check"] = json.loads((work / "export.json").read_text())["logits_check"]
    results = json.loads((work / "eval" / "results.json").read_text())
    point["eval_results"] = {"test": results["test"], "retrieval": {
        k: v["accuracy"] for k, v in results["long_context"]["retrieval"]["pretrain"].items()},
        "loss_by_position": [b["loss"] for b in results["long_context"]["loss_by_position"]["pretrain"]]}
    point["disk_gib"] = {name: sum(f.stat().st_size for f in (work / name).rglob("*") if f.is_file()) / 2**30
                         for name in ("checkpoints", "hf")}
    logs = work.parent / f"logs-{experts}"  # kept: the stages' own output beside the figures
    logs.mkdir(exist_ok=True)
    for log in work.glob("*.log"):
        shutil.copy2(log, logs / log.name)
    shutil.rmtree(work)
    return point


def machine() -> dict:
    """The GPU and the versions the figures were measured with."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def version(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "absent"

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                          "-i", "0"], capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu, **{name: version(name) for name in ("torch", "transformers", "megatron-core",
                                                            "megatron-bridge", "transformer-engine", "mamba-ssm")}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,32", help="expert counts to measure (comma-separated)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/full-depth"))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--data-only", action="store_true", help="make data/fulldepth and stop")
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_checkpoint(args.build, args.work)
        return {}
    make_data()
    if args.data_only:
        return {}
    points = [one_point(int(e), args.work / f"experts-{e}") for e in args.experts.split(",")]
    full = estimates(128, args.work)
    print(f"== 128 experts (the nano3 preset, 31.6B): estimate export {full['export']['gpu_gib']:.1f} GiB GPU / "
          f"{full['export']['host_gib']:.1f} GiB host, eval {full['eval']['gpu_gib']:.1f} GiB GPU / "
          f"{full['eval']['host_gib']:.1f} GiB host")
    result = {"machine": machine(), "points": points, "estimate_128": full}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
