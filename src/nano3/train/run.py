"""The training driver of the pretrain and lc stages (train.pretrain, train.lc): plan, then run each phase with
torchrun, then write the stage manifest.

Checkpoints go to `checkpoints/<stage>/<run digest>/` (rundir.identity): a killed or preempted run
restarts in the same directory and Bridge resumes from its latest checkpoint; a run with different
hyperparameters gets a fresh directory. The DVC out is `checkpoints/<stage>.json`, a small manifest
pointing at the checkpoint, never the checkpoint tree itself, and naming the code that trained it (rundir.record_code).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from nano3.config import parse_override, section_name
from nano3.errors import UserError
from nano3.files import atomic_write_json, read_json
from nano3.train import rundir, spec
from nano3.train.backends import TrainingRun, for_backend, resolve_backend, train_on
from nano3.train.plan import Plan, build_plan, local_gpus
from nano3.train.rundir import exit_if_stopped, latest_iteration, manifest_path
from nano3.train.rundir.identity import run_digest, upstream_digests
from nano3.train.rundir.repair import set_aside_unfinished_save


def print_plan(plan: Plan, stage: str, backend: str, memory: tuple[float, str] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    s = plan.stages[section_name(stage)]
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
                                       f"{mem.activations_gib:.1f} + allocator overhead {mem.overhead_gib:.1f} + CUDA context "
                                       f"{mem.context_gib:.1f}"
                                       + (f"; fits {memory[1]}: {memory[0]:.1f} GiB" if memory else ""))
    host = s.host
    table.add_row("host memory/rank (est.)", f"{host.total_gib:.1f} GiB = process {host.rank_gib:.1f} + data loader "
                                             f"{host.loader_gib:.1f} + checkpoint staging {host.checkpoint_gib:.1f}")
    table.add_row("GFLOP/token", f"{s.flops_per_token_true / 1e9:.2f} (true Mamba width), "
                                 f"{s.flops_per_token_bridge / 1e9:.2f} (Bridge's formula)")
    table.add_row("GPU-hours", f"{s.gpu_hours:,.1f} at the measured throughput (train.measured_tflops_per_gpu)")
    Console().print(table)


def gpu_memory_target(gpu_memory_gib: float | None) -> tuple[float, str]:
    """The card a Megatron plan must fit: --gpu-memory, else the CLUSTER profile's, else this machine's GPU,
    else an H100 80GB."""
    from nano3.train.plan import DEFAULT_GPU_MEMORY_GIB, local_gpu_memory

    if gpu_memory_gib is not None:
        return gpu_memory_gib, "--gpu-memory"
    if os.environ.get("CLUSTER"):
        from nano3.config.clusters import get_profile

        return get_profile(os.environ["CLUSTER"]).gpu_memory()
    return local_gpu_memory() or (DEFAULT_GPU_MEMORY_GIB, "an H100 80GB (the default; --gpu-memory or CLUSTER=<profile>)")


def stack_splits_kv_groups() -> bool | None:
    """Whether the stack that trains splits a KV group over TP ranks: the CLUSTER profile's image as it declares
    (tp_above_kv_groups), else None: the installed megatron-core's (plan.build_plan)."""
    if os.environ.get("CLUSTER"):
        from nano3.config.clusters import get_profile

        return get_profile(os.environ["CLUSTER"]).tp_above_kv_groups
    return None


def host_memory_target() -> tuple[float, str] | None:
    """A node's host memory that the ranks on it must fit: the CLUSTER profile's host_memory_gib, else this
    machine's RAM if it has GPUs (the run goes here), else None (not checked)."""
    from nano3.train.plan import GIB, local_gpus

    if os.environ.get("CLUSTER"):
        from nano3.config.clusters import get_profile

        return get_profile(os.environ["CLUSTER"]).host_memory()
    if local_gpus():
        import psutil

        return psutil.virtual_memory().total / GIB, "this machine"
    return None


def check_lc_mix_on_megatron(params) -> None:
    """lc.mix on Megatron is packed (THD) sequences: one sample per micro-batch, megatron-core's fused Mamba path
    (the only one that trains packed sequences), and with context parallelism every short sequence split evenly
    over 2 x CP chunks."""
    cfg = params.settings
    mix, lc = cfg.lc.mix, cfg.lc
    if not mix.short_share:
        return
    where = f"{params.source}: lc.mix.short_share={mix.short_share}"
    if lc.micro_batch_size != 1:
        raise UserError(f"{where} sends short sequences packed, one sample per micro-batch; set lc.micro_batch_size=1")
    if not cfg.train.kernels.fused_mamba:
        raise UserError(f"{where}: megatron-core trains packed sequences only on the fused Mamba path; set "
                        f"train.kernels.fused_mamba=true (it needs causal-conv1d, which the NeMo image has)")
    cp = lc.parallel.cp
    if cp > 1 and mix.short_length % (2 * cp):
        raise UserError(f"{where}: with lc.parallel.cp={cp} every short sequence is split into {2 * cp} chunks; "
                        f"make lc.mix.short_length ({mix.short_length}) a multiple of {2 * cp}")


def check_bridge_fields(bridge: dict, log) -> None:
    """--dry-run: set the command line's `bridge.*` fields on Bridge's recipe config as the ranks will (an unknown
    field is an error); where Bridge does not import (a CPU machine), say that they were not checked."""
    if not bridge:
        return
    names = ", ".join(f"bridge.{key}" for key in bridge)
    try:
        from nano3.train.entry import build_config

        build_config(dict(bridge))
    except UserError:
        raise
    except Exception as e:  # not installed, or no GPU stack under it (Transformer Engine)
        log(f"dry run: {names} not checked: Megatron-Bridge does not import here ({type(e).__name__}: {e}); the "
            f"ranks check them when they start (a --dry-run on a machine with the training stack checks them now)")
        return
    log(f"dry run: {names} set on Megatron-Bridge's recipe config")


def phase_bridge_fields(params, plan: Plan, stage: str, bridge: dict) -> dict[str, dict]:
    """--dry-run: the Bridge fields each phase's spec will hold (train.spec), before any run directory exists."""
    from nano3.train.mapping import bridge_overrides

    run_dir = str(rundir.run_dir(params.settings.train, stage, "<run digest>"))
    pretrained = "<pretrain's checkpoint>" if stage == "lc" else None
    return {p.name: bridge_overrides(params, plan.schedule, p, run_dir, pretrained) | bridge
            for p in plan.schedule.phases if (p.name == "lc") == (stage == "lc")}


def print_bridge_fields(fields: dict[str, dict], stage: str, log) -> None:
    """Every field of the first phase, then what each later phase changes."""
    before, previous = {}, None
    for phase, values in fields.items():
        changed = {k: v for k, v in values.items() if k not in before or before[k] != v}
        log(f"{stage} {phase}: Megatron-Bridge fields" + (f" that differ from {previous}" if previous else
                                                          f" ({len(values)}; Bridge's recipe defaults for the rest)"))
        for key in sorted(changed):
            log(f"  {key} = {changed[key]!r}")
        before, previous = values, phase


def check_pinned_data(params, strict: bool, log) -> None:
    """A hub dataset without a `revision` reads whatever the Hub holds when prep runs: a rerun months later is other
    data under the same params. The plan says so; `--strict` (`make plan STRICT=1`) refuses it."""
    unpinned = [n for n, d in params.settings.datasets.items() if d.source.startswith("hf://") and not d.revision]
    if not unpinned:
        return
    text = (f"{len(unpinned)} hub dataset(s) without a revision ({', '.join(unpinned[:3])}"
            f"{', ...' if len(unpinned) > 3 else ''}): prep reads whatever the Hub holds then; pin "
            f"datasets.<name>.revision to a commit")
    if strict:
        raise UserError(f"{text} (--strict)")
    log(f"warning: {text}")


def run_training_stage(stage: str, requested, bridge_cli: list[str], dry_run: bool, log=print,
                       gpu_memory_gib: float | None = None, strict: bool = False, show_bridge: bool = False) -> dict | None:
    """`requested`: params.yaml with the command line's overrides applied; `bridge_cli`: the command line's
    Megatron-Bridge fields (`section.field=value`). Each phase's spec (train.spec) holds both for the ranks."""

    backend = resolve_backend(requested)
    params = for_backend(requested, backend)
    bridge = dict(parse_override(text) for text in bridge_cli)
    if stage == "lc" and backend == "megatron":
        check_lc_mix_on_megatron(params)
    memory = gpu_memory_target(gpu_memory_gib) if backend == "megatron" else None
    host = host_memory_target() if backend == "megatron" else None
    plan = build_plan(params, stages=(section_name(stage),), gpu_memory=memory, host_memory=host,
                      tp_above_kv_groups=stack_splits_kv_groups() if backend == "megatron" else True)
    print_plan(plan, stage, backend, memory)
    report = Path("reports") / "plan"
    report.mkdir(parents=True, exist_ok=True)
    fields = phase_bridge_fields(params, plan, stage, bridge) if backend == "megatron" else {}
    atomic_write_json(report / f"{stage}.json", plan.as_dict() | {"backend": backend, "bridge_fields": fields})
    if dry_run:
        if show_bridge:
            print_bridge_fields(fields, stage, log)
        elif fields:
            log(f"{stage}: the Megatron-Bridge fields of each phase: make plan BRIDGE=1, or {report / f'{stage}.json'}")
        check_bridge_fields(bridge, log)
        check_pinned_data(params, strict, log)
        return None

    layout = plan.stages[section_name(stage)].layout
    have = local_gpus()
    if backend == "megatron" and have < layout.gpus_per_node:
        raise UserError(f"{stage}: {section_name(stage)}.gpus_per_node={layout.gpus_per_node} but this machine has "
                        f"{have} CUDA GPUs; use --dry-run here, run on a GPU machine or cluster, or set "
                        f"train.backend=reference (CPU, tiny presets)")
    if backend == "reference" and bridge_cli:
        raise UserError(f"{stage}: Megatron-Bridge overrides {bridge_cli} mean nothing to the CPU reference backend")

    upstream = upstream_digests(params, stage)
    digest = run_digest(params, stage, {**upstream, "backend": backend})
    run_dir = rundir.run_dir(params.settings.train, stage, digest)
    node0 = os.environ.get("SLURM_NODEID", "0") == "0"
    if backend == "reference" and not node0:  # one device: a second node training too would race on the run
        log(f"{stage}: node {os.environ['SLURM_NODEID']} ({os.environ.get('SLURMD_NODENAME', '?')}) of job "
            f"{os.environ.get('SLURM_JOB_ID')} stands by: the reference backend trains on node 0 only")
        return None
    phases = [p for p in plan.schedule.phases if (p.name == "lc") == (stage == "lc")]
    pretrained = None
    if stage == "lc":
        pre = read_json(manifest_path(params.settings.train, "pretrain"), "pretrain manifest (run make pretrain)")
        pretrained = pre["checkpoint"]
        if pre.get("backend", "megatron") != backend:
            raise UserError(f"{manifest_path(params.settings.train, 'pretrain')}: pretrained with the "
                            f"{pre.get('backend', 'megatron')} backend but lc would run on {backend}; rerun "
                            f"pretrain with train.backend={backend}")
    # node 0 holds the run's lock (the other nodes' processes are the same training)
    live_dir = rundir.live_dir(params.settings.train, stage)
    with rundir.hold_run(run_dir) if node0 else nullcontext() as lock_fd:
        if node0 and backend == "megatron":  # before the iteration is read below, and before any node's ranks start
            set_aside_unfinished_save(run_dir, log)
        if node0 and (ready := rundir.node0_ready(run_dir)):
            ready.touch()
        elif not node0:
            rundir.wait_for_node0(run_dir)
        done = latest_iteration(run_dir)
        if node0:
            rundir.adopt_workspace_metrics(run_dir, live_dir)
            if done >= phases[-1].end_iter:
                log(f"{stage}: run {digest} finished at iteration {done} before: reused, not retrained; its "
                    f"metrics are back in {live_dir}")
        code = rundir.record_code(run_dir, stage, done, phases[-1].end_iter, log) if node0 else []
        specs = {p.name: spec.write(run_dir, spec.build(params, p, run_dir, backend, pretrained, bridge))
                 for p in phases if done < p.end_iter}
        training = TrainingRun(stage=stage, params=params, plan=plan, phases=phases, run_dir=run_dir,
                               live_dir=rundir.run_live_dir(run_dir), pretrained=pretrained, specs=specs,
                               lock_fd=lock_fd)
        try:
            if done < phases[-1].end_iter:
                train_on(backend, training, log)
        finally:
            if node0:  # finished, stopped or failed: the workspace shows this run's metrics as far as they go
                rundir.publish_metrics(run_dir, live_dir, stage, log)
    exit_if_stopped(run_dir, stage, phases, log)

    if not node0:
        return None  # every node ran the same phases; node 0 writes the manifest
    iteration = latest_iteration(run_dir)
    manifest = {"stage": stage, "digest": digest, "run_dir": str(run_dir), "iteration": iteration,
                "checkpoint": str(run_dir), "upstream": upstream, "backend": backend,
                "format": "hf" if backend == "reference" else "megatron",
                "phases": [{"name": p.name, "end_iter": p.end_iter, "blend": p.blend} for p in phases],
                "code": code,
                "metrics": rundir.full_metrics(run_dir)}
    atomic_write_json(manifest_path(params.settings.train, stage), manifest)
    return manifest


def add_options(parser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the plan (no GPU needed) and exit")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="plan for GPUs of this many GiB (default: the CLUSTER profile's, this machine's, or 79.6)")
    parser.add_argument("--bridge-fields", action="store_true",
                        help="with --dry-run: print the Megatron-Bridge fields each phase will get (make plan BRIDGE=1)")
    parser.add_argument("--strict", action="store_true",
                        help="with --dry-run: refuse hub datasets without a pinned revision (a warning otherwise)")
    parser.set_defaults(takes_bridge_overrides=True)


def run_from_args(stage: str, params, args) -> dict | None:
    """Stage `pretrain` or `lc` from its command line (train.pretrain, train.lc): the plan, then each phase on the
    backend; the stage manifest."""
    return run_training_stage(stage, params, args.bridge, dry_run=args.dry_run, gpu_memory_gib=args.gpu_memory,
                              strict=args.strict, show_bridge=args.bridge_fields)
