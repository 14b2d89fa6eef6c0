"""The parallel layout: GPUs and the TP/PP/CP/EP/ETP/DP split, checked with megatron-core's own divisibility rules
before any job, so an impossible layout fails here with a message naming the key, not minutes into a job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from nano3.errors import UserError
from nano3.model.presets import ModelPreset


@dataclass(frozen=True)
class Layout:
    stage: str  # train | lc: the params section it comes from
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    sequence_parallel: bool
    micro_batch_size: int
    global_batch_size: int
    seq_length: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.pp * self.ep * self.etp)

    @property
    def microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def resources(params, stage: str, cluster_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node): params.yaml's when set, else the cluster profile's, else the Slurm
    allocation this runs in, else this machine (all its GPUs, at least 1 for planning)."""
    if cluster_shape is not None:
        default = cluster_shape
    elif "SLURM_JOB_NUM_NODES" in os.environ:
        default = (int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ.get("SLURM_GPUS_ON_NODE", "1") or 1))
    else:
        default = None
    section = getattr(params.settings, stage)
    nodes, gpus = section.nodes, section.gpus_per_node
    if default is None and (nodes is None or gpus is None):
        default = (1, max(1, local_gpus()))
    return (nodes if nodes is not None else default[0], gpus if gpus is not None else default[1])


def read_layout(params, stage: str, cluster_shape: tuple[int, int] | None = None) -> Layout:
    section = getattr(params.settings, stage)
    par = section.parallel
    nodes, gpus = resources(params, stage, cluster_shape)
    sequence_parallel = par.sequence_parallel if par.sequence_parallel is not None else par.tp > 1
    return Layout(stage=stage, nodes=nodes, gpus_per_node=gpus, tp=par.tp, pp=par.pp, cp=par.cp, ep=par.ep,
                  etp=par.etp, sequence_parallel=sequence_parallel, micro_batch_size=section.micro_batch_size,
                  global_batch_size=section.global_batch_size, seq_length=section.seq_length)


def layout_errors(layout: Layout, preset: ModelPreset, tp_above_kv_groups: bool = True) -> list[str]:
    """Every reason megatron-core would refuse this layout (empty when it is valid); `tp_above_kv_groups`: whether
    the stack that runs it splits a KV group over TP ranks (megatron_compat.tp_splits_kv_groups)."""
    s, errs = layout.stage, []
    p = f"{s}.parallel"
    if layout.world < 1:
        return [f"{s}.nodes x {s}.gpus_per_node must be at least 1 GPU"]
    model_par = layout.tp * layout.pp * layout.cp
    if layout.world % model_par:
        errs.append(f"{p}: TP x PP x CP = {layout.tp}x{layout.pp}x{layout.cp} = {model_par} does not divide "
                    f"the {layout.world} GPUs ({layout.nodes} nodes x {layout.gpus_per_node})")
        return errs
    if (layout.world // layout.pp) % (layout.ep * layout.etp):
        errs.append(f"{p}: EP x ETP = {layout.ep * layout.etp} does not divide the {layout.world // layout.pp} GPUs "
                    f"of a pipeline stage")
    if preset.num_moe_experts % layout.ep:
        errs.append(f"{p}.ep={layout.ep} does not divide the {preset.num_moe_experts} experts")
    if preset.num_layers % layout.pp:
        errs.append(f"{p}.pp={layout.pp} does not divide the {preset.num_layers} layers")
    if preset.num_attention_heads % layout.tp:
        errs.append(f"{p}.tp={layout.tp} does not divide the {preset.num_attention_heads} attention heads")
    if preset.num_query_groups % layout.tp and layout.tp % preset.num_query_groups:
        errs.append(f"{p}.tp={layout.tp} must divide or be a multiple of the {preset.num_query_groups} KV groups")
    elif layout.tp > preset.num_query_groups and not tp_above_kv_groups:
        errs.append(f"{p}.tp={layout.tp} is above the {preset.num_query_groups} KV groups, which the stack that runs "
                    f"it cannot split (megatron-core splits them from 0.16.0)")
    if preset.mamba_num_groups % layout.tp:
        errs.append(f"{p}.tp={layout.tp} does not divide the {preset.mamba_num_groups} Mamba groups")
    elif layout.cp > 1:
        heads_local, groups_local = preset.mamba_num_heads // layout.tp, preset.mamba_num_groups // layout.tp
        if heads_local % layout.cp:
            errs.append(f"{p}.cp={layout.cp} does not divide the {heads_local} Mamba heads per TP rank")
        elif (groups_local < layout.cp and layout.cp % groups_local) or (groups_local >= layout.cp and groups_local % layout.cp):
            errs.append(f"{p}.cp={layout.cp} and the {groups_local} Mamba groups per TP rank must divide one another")
    if layout.tp > 1 and layout.ep > 1 and not layout.sequence_parallel:
        errs.append(f"{p}: MoE with TP > 1 needs sequence_parallel: true")
    if layout.cp > 1 and layout.seq_length % (2 * layout.cp):
        errs.append(f"{s}.seq_length={layout.seq_length} must be divisible by 2 x CP = {2 * layout.cp}")
    if layout.sequence_parallel and (layout.seq_length // layout.cp) % layout.tp:
        errs.append(f"{s}.seq_length / CP must be divisible by TP={layout.tp} with sequence parallelism")
    if layout.global_batch_size % (layout.micro_batch_size * layout.dp):
        errs.append(f"{s}.global_batch_size={layout.global_batch_size} is not a multiple of micro_batch_size x DP = "
                    f"{layout.micro_batch_size}x{layout.dp}")
    return errs


def validate_layout(layout: Layout, preset: ModelPreset, tp_above_kv_groups: bool = True, hint: str = "") -> None:
    errs = layout_errors(layout, preset, tp_above_kv_groups)
    if errs and hint and layout.tp > preset.num_query_groups and not tp_above_kv_groups:
        errs[0] += hint
    if errs:
        raise UserError(errs[0] if len(errs) == 1 else f"{errs[0]} (and {len(errs) - 1} more: {'; '.join(errs[1:])})")
