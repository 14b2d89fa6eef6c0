"""The pretrain and lc stages: plan, then run each phase with torchrun, then write the stage manifest.

Checkpoints go to `checkpoints/<stage>/<run digest>/` (mapping.run_digest): a killed or preempted run
restarts in the same directory and Bridge resumes from its latest checkpoint; a run with different
hyperparameters gets a fresh directory. The DVC out is `checkpoints/<stage>.json`, a small manifest
pointing at the checkpoint, never the checkpoint tree itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nano3.errors import UserError
from nano3.files import atomic_write_json, read_json
from nano3.train.entry import failure_path
from nano3.train.mapping import file_digest, run_digest
from nano3.train.plan import Plan, build_plan, local_gpus

STAGE_SECTION = {"pretrain": "train", "lc": "lc"}


def latest_iteration(run_dir: str | Path) -> int:
    tracker = Path(run_dir) / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text().strip()) if tracker.exists() else 0


def checkpoint_dir(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / f"iter_{iteration:07d}"


def upstream_digests(params, stage: str) -> dict[str, str]:
    blend_dir = Path(params.get_key("blend.out_dir", kind=str))
    tok = Path(params.get_key("tokenizer.dir", kind=str)) / "info.json"
    if stage == "pretrain":
        return {"phase1": file_digest(blend_dir / "phase1.json"), "phase2": file_digest(blend_dir / "phase2.json"),
                "tokenizer": file_digest(tok)}
    return {"lc": file_digest(blend_dir / "lc.json"), "tokenizer": file_digest(tok),
            "pretrain": file_digest(manifest_path(params, "pretrain"))}


def manifest_path(params, stage: str) -> Path:
    return Path(params.get_key("train.checkpoint_dir", "checkpoints", kind=str)) / f"{stage}.json"


def print_plan(plan: Plan, stage: str, backend: str, memory: tuple[float, str] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    s = plan.stages[STAGE_SECTION[stage]]
    lay, mem = s.layout, s.memory
    table = Table(title=f"{stage} plan: {plan.preset_name} ({plan.params_total / 1e9:.3g}B total, "
                        f"{plan.params_active / 1e9:.3g}B active, {plan.preset.num_layers} layers)", show_header=False)
    table.add_row("backend", "megatron (Megatron-Bridge on GPUs)" if backend == "megatron" else
                  "reference (this machine has no CUDA GPU: the CPU budget train.reference / lc.reference; "
                  "plan the GPU run with train.backend=megatron)")
    table.add_row("GPUs", f"{lay.world} = {lay.nodes} nodes x {lay.gpus_per_node}")
    table.add_row("layout", f"TP {lay.tp}  PP {lay.pp}  CP {lay.cp}  EP {lay.ep}  ETP {lay.etp}  DP {lay.dp}  "
                            f"SP {lay.sequence_parallel}")
    table.add_row("batch", f"{lay.global_batch_size} x {lay.seq_length} tokens = micro {lay.micro_batch_size} x DP "
                           f"{lay.dp} x {lay.microbatches} microbatches")
    table.add_row("iterations", f"{s.iterations:,} ({s.tokens:,} tokens)")
    if stage == "pretrain":
        sch = plan.schedule
        lr = sch.pretrain_lr
        table.add_row("phases", f"phase1 1..{sch.switch_iter}, phase2 {sch.switch_iter + 1}..{sch.pretrain_iters}")
        table.add_row("LR (WSD)", f"warmup to {lr.lr:g} by {lr.warmup_iters}, hold to {lr.decay_start_iter}, "
                                  f"{lr.wsd_decay_style} decay to {lr.min_lr:g} at {lr.decay_iters}")
    else:
        table.add_row("LR", f"constant {plan.schedule.lc_lr.lr:g}")
    table.add_row("memory/GPU (est.)", f"{mem.total_gib:.1f} GiB = weights {mem.weights_gib:.1f} + grads "
                                       f"{mem.grads_gib:.1f} + optimizer {mem.optimizer_gib:.1f} + activations "
                                       f"{mem.activations_gib:.1f} + overhead {mem.overhead_gib:.1f}"
                                       + (f"; fits {memory[1]}: {memory[0]:.1f} GiB" if memory else ""))
    table.add_row("GFLOP/token", f"{s.flops_per_token_true / 1e9:.2f} (true Mamba width), "
                                 f"{s.flops_per_token_bridge / 1e9:.2f} (Bridge's formula)")
    table.add_row("GPU-hours", f"{s.gpu_hours:,.1f} at the measured throughput (train.measured_tflops_per_gpu)")
    Console().print(table)


def torchrun_command(nproc: int) -> list[str]:
    """torchrun for this node: standalone here, or one node of a Slurm allocation (rendezvous on node 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        master = os.environ.get("MASTER_ADDR")
        if not master:
            raise UserError("multi-node run without MASTER_ADDR; launch through stages/<stage>.sbatch")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={os.environ['SLURM_NODEID']}",
                f"--master_addr={master}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "nano3.train.entry"]


def run_forwarding_sigterm(cmd: list[str]) -> int:
    """Run torchrun in its own session; SIGTERM (Slurm's pre-time-limit signal, passed on by the
    sbatch script) or Ctrl-C goes straight to the training ranks as SIGTERM, and Bridge's handler
    saves a checkpoint and exits cleanly. torchrun itself is spared: its own SIGTERM handling kills
    the ranks after a grace period that a large checkpoint can outlast."""
    import signal

    import psutil

    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, _frame):
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_if_stopped(run_dir: Path, stage: str, phases: list, log) -> None:
    """Phases that ended before their last iteration were stopped by a signal: exit 3, the next run resumes.
    The message names the phase the last checkpoint belongs to."""
    done = latest_iteration(run_dir)
    stopped = next((p for p in phases if done < p.end_iter), None)
    if stopped is not None:
        log(f"{stage}: {stopped.name} stopped at iteration {done}; rerun to resume")
        raise SystemExit(3)


def prepare_live_dir(live_dir: Path, digest: str) -> None:
    """Metrics of another run (other hyperparameters) are cleared; those of this run are kept."""
    marker = live_dir / "run.json"
    if marker.exists() and json.loads(marker.read_text()).get("digest") != digest:
        shutil.rmtree(live_dir)
    live_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"digest": digest})


def gpu_memory_target(gpu_memory_gib: float | None) -> tuple[float, str]:
    """The card a Megatron plan must fit: --gpu-memory, else the CLUSTER profile's, else this machine's GPU,
    else an H100 80GB."""
    from nano3.train.plan import DEFAULT_GPU_MEMORY_GIB, local_gpu_memory

    if gpu_memory_gib is not None:
        return gpu_memory_gib, "--gpu-memory"
    if os.environ.get("CLUSTER"):
        from nano3.launch.profiles import get_profile

        profile = get_profile(os.environ["CLUSTER"])
        return profile.gpu_memory_gib, f"cluster '{profile.name}' (gpu_memory_gib)"
    return local_gpu_memory() or (DEFAULT_GPU_MEMORY_GIB, "an H100 80GB (the default; --gpu-memory or CLUSTER=<profile>)")


def run_training_stage(stage: str, params_file: str, our_overrides: list[str], bridge_cli: list[str],
                       dry_run: bool, log=print, gpu_memory_gib: float | None = None) -> dict | None:
    from nano3.config import load_params
    from nano3.train.reference import for_backend, resolve_backend

    requested = load_params(params_file, our_overrides)
    backend = resolve_backend(requested)
    params = for_backend(requested, backend)
    memory = gpu_memory_target(gpu_memory_gib) if backend == "megatron" else None
    plan = build_plan(params, stages=(STAGE_SECTION[stage],), gpu_memory=memory)
    print_plan(plan, stage, backend, memory)
    report = Path("reports") / "plan"
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report / f"{stage}.json", plan.as_dict() | {"backend": backend})
    if dry_run:
        return None

    layout = plan.stages[STAGE_SECTION[stage]].layout
    have = local_gpus()
    if backend == "megatron" and have < layout.gpus_per_node:
        raise UserError(f"{stage}: {STAGE_SECTION[stage]}.gpus_per_node={layout.gpus_per_node} but this machine has "
                        f"{have} CUDA GPUs; use --dry-run here, run on a GPU machine or cluster, or set "
                        f"train.backend=reference (CPU, tiny presets)")
    if backend == "reference" and bridge_cli:
        raise UserError(f"{stage}: Megatron-Bridge overrides {bridge_cli} mean nothing to the CPU reference backend")

    upstream = upstream_digests(params, stage)
    digest = run_digest(params, stage, {**upstream, "backend": backend})
    root = Path(params.get_key("train.checkpoint_dir", "checkpoints", kind=str))
    run_dir = root / stage / digest
    live_dir = Path(params.get_key("train.live_dir", "dvclive", kind=str)) / stage
    prepare_live_dir(live_dir, digest)
    pretrained = None
    if stage == "lc":
        pre = read_json(manifest_path(params, "pretrain"), "pretrain manifest (run make pretrain)")
        pretrained = pre["checkpoint"]
        if pre.get("backend", "megatron") != backend:
            raise UserError(f"{manifest_path(params, 'pretrain')}: pretrained with the {pre.get('backend', 'megatron')} "
                            f"backend but lc would run on {backend}; rerun pretrain with train.backend={backend}")
    phases = [p for p in plan.schedule.phases if (p.name == "lc") == (stage == "lc")]
    if backend == "reference":
        from nano3.train.reference import train_reference

        train_reference(params, plan, stage, phases, run_dir, live_dir, pretrained, log)
        exit_if_stopped(run_dir, stage, phases, log)
    else:
        for phase in phases:
            done = latest_iteration(run_dir)
            if done >= phase.end_iter:
                log(f"{stage}: {phase.name} already done (checkpoint at iteration {done})")
                continue
            log(f"{stage}: {phase.name} iterations {max(done, phase.start_iter) + 1}..{phase.end_iter} "
                f"(blend {phase.blend}, seq {phase.seq_length}, run {digest})")
            cmd = torchrun_command(layout.gpus_per_node) + [
                "--params", params_file, "--phase", phase.name, "--run-dir", str(run_dir), "--live-dir", str(live_dir)]
            cmd += [f"--override={o}" for o in our_overrides] + [f"--bridge={b}" for b in bridge_cli]
            if pretrained:
                cmd += ["--pretrained", pretrained]
            rc = run_forwarding_sigterm(cmd)
            refused = failure_path(run_dir, phase.name)
            if rc != 0 and refused.exists():
                reason = refused.read_text().strip()
                refused.unlink()
                raise UserError(reason)
            if rc != 0:
                raise SystemExit(rc)
            exit_if_stopped(run_dir, stage, [phase], log)
            if phase.exit_interval:
                log(f"{stage}: {phase.name} stopped at iteration {phase.end_iter} as planned (Bridge reports its "
                    f"exit_interval stop as 'SystemExit: 0' with a traceback; not an error)")

    if os.environ.get("SLURM_NODEID", "0") != "0":
        return None  # every node ran the same phases; node 0 writes the manifest
    iteration = latest_iteration(run_dir)
    summary_file = live_dir / "metrics.json"
    manifest = {"stage": stage, "digest": digest, "run_dir": str(run_dir), "iteration": iteration,
                "checkpoint": str(run_dir), "upstream": upstream, "backend": backend,
                "format": "hf" if backend == "reference" else "megatron",
                "phases": [{"name": p.name, "end_iter": p.end_iter, "blend": p.blend} for p in phases],
                "metrics": json.loads(summary_file.read_text()) if summary_file.exists() else {}}
    atomic_write_json(manifest_path(params, stage), manifest)
    return manifest


def training_stage_main(stage: str, description: str) -> None:
    """The command line of stages/pretrain.py and stages/lc.py: `[--dry-run] [key=value ...]`."""
    from nano3.cli import run_stage, stage_parser
    from nano3.config import load_params
    from nano3.train.mapping import split_cli_overrides

    def main(args, _params) -> None:
        ours, bridge = split_cli_overrides(load_params(args.params), args.overrides)
        run_training_stage(stage, args.params, ours, bridge, dry_run=args.dry_run, gpu_memory_gib=args.gpu_memory)

    parser = stage_parser(description)
    parser.add_argument("--dry-run", action="store_true", help="print the plan (no GPU needed) and exit")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="plan for GPUs of this many GiB (default: the CLUSTER profile's, this machine's, or 79.6)")
    run_stage(main, parser, load=False)
