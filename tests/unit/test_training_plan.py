"""CPU tests of the training side: presets, schedule arithmetic, layout validation, FLOPs, the Bridge mapping."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from nano3.config import Params, load_params
from nano3.config.overrides import split_cli_overrides
from nano3.errors import UserError
from nano3.model.flops import flops_per_token, param_counts
from nano3.model.presets import NANO3_PATTERN, PRESETS, model_preset
from nano3.schedule import build_schedule
from nano3.train.mapping import bridge_overrides
from nano3.train.plan import build_plan, estimate_memory, layout_errors, read_layout
from nano3.train.rundir.identity import run_digest
from tests.conftest import ROOT


@pytest.fixture
def params(tmp_path, spm_dir) -> Params:
    p = load_params(ROOT / "params.yaml")
    p["tokenizer"]["dir"] = str(spm_dir)
    p["blend"]["out_dir"] = str(tmp_path / "blend")
    return p


def production(params: Params, **train) -> Params:
    """The recipe's scale on top of the embedded params (as configs/nano3.yaml sets it)."""
    params["model"]["preset"] = "nano3"
    params["train"].update(tokens=25e12, seq_length=4096, global_batch_size=8192, micro_batch_size=1, nodes=2,
                           gpus_per_node=8, lr=1e-4, min_lr=1e-5, warmup_fraction=0.001,
                           parallel={"tp": 1, "pp": 1, "cp": 1, "ep": 8, "etp": 1})
    params["train"].update(train)
    return params


def test_nano3_preset_matches_the_published_model():
    p = PRESETS["nano3"]
    assert p.hybrid_layer_pattern == NANO3_PATTERN and p.num_layers == 52
    assert (p.count("M"), p.count("E"), p.count("*")) == (23, 23, 6)
    counts = param_counts(p, 131072)
    assert counts.total / 1e9 == pytest.approx(31.6, abs=0.05)  # tech report: 31.6B total
    assert counts.active / 1e9 == pytest.approx(3.2, abs=0.05)  # 3.2B active (the input embedding is a lookup)


def test_tiny_keeps_every_layer_kind_and_feature():
    tiny, nano = PRESETS["tiny"], PRESETS["nano3"]
    assert set(tiny.hybrid_layer_pattern) == set(nano.hybrid_layer_pattern) == {"M", "E", "*"}
    assert tiny.num_query_groups < tiny.num_attention_heads  # GQA
    assert tiny.mamba_num_groups > 1 and tiny.moe_shared_expert_intermediate_size > 0 and tiny.moe_router_topk > 1
    assert param_counts(tiny, 8192).total < 50e6


def test_flops_true_vs_bridge_mamba_width():
    p = PRESETS["nano3"]
    true, bridge = flops_per_token(p, 8192, 131072, "true"), flops_per_token(p, 8192, 131072, "bridge")
    assert true / 1e9 == pytest.approx(20.8, abs=0.1) and bridge / 1e9 == pytest.approx(22.3, abs=0.1)
    assert 1.06 < bridge / true < 1.08  # Bridge over-counts Mamba by ~7%


def test_lc_mix_counts_short_sequences_attention_at_their_length(params):
    """With lc.mix, a share of lc's samples are packed short sequences: the plan's FLOPs per token (TFLOP/s,
    GPU-hours) count their attention over short_length tokens, the rest over lc's length; pretrain is unaffected."""
    p = production(params)
    p["lc"].update(seq_length=65536, mix={"short_share": 0.25, "short_length": 1024})
    plan = build_plan(p)
    preset, lc = PRESETS["nano3"], plan.stages["lc"]
    long, short = (flops_per_token(preset, n, plan.vocab, "true") for n in (65536, 1024))
    assert short < lc.flops_per_token_true < long
    assert lc.flops_per_token_true == pytest.approx(0.75 * long + 0.25 * short)
    assert plan.stages["train"].flops_per_token_true == pytest.approx(flops_per_token(preset, 4096, plan.vocab, "true"))


def test_schedule_phase_switch_and_wsd_lr(params):
    s = build_schedule(production(params).settings)
    assert s.pretrain_iters == round(25e12 / (8192 * 4096))
    assert s.switch_iter == round(s.pretrain_iters * 0.94)
    p1, p2 = s.phase("phase1"), s.phase("phase2")
    assert (p1.end_iter, p2.start_iter, p2.end_iter) == (s.switch_iter, s.switch_iter, s.pretrain_iters)
    assert p1.train_iters == p2.train_iters == s.pretrain_iters  # one continuous schedule across the switch
    lr = s.pretrain_lr
    assert lr.lr_at(lr.warmup_iters) == pytest.approx(1e-4)
    assert lr.lr_at(round(0.8 * s.pretrain_iters)) == pytest.approx(1e-4)  # held to 80% ...
    assert lr.lr_at(s.pretrain_iters) == pytest.approx(1e-5)  # ... decayed to min_lr at the end
    mid = round(0.9 * s.pretrain_iters)
    assert lr.lr_at(mid) == pytest.approx(1e-5 + 0.5 * 9e-5, rel=1e-3)  # linear: halfway down at 90%
    assert lr.lr_at(s.switch_iter) == pytest.approx(1e-5 + 0.3 * 9e-5, rel=1e-3)  # same curve at the switch
    assert s.lc_lr.lr_at(1) == s.lc_lr.lr_at(s.lc_iters) == params["lc"]["lr"]


@pytest.mark.parametrize("change,message", [
    ({"parallel": {"tp": 3, "pp": 1, "cp": 1, "ep": 1}}, "TP x PP x CP = 3x1x1 = 3 does not divide the 16 GPUs"),
    ({"parallel": {"tp": 1, "pp": 1, "cp": 1, "ep": 32}}, "EP x ETP = 32 does not divide the 16 GPUs"),
    ({"parallel": {"tp": 1, "pp": 1, "cp": 1, "ep": 16}, "model": {"num_moe_experts": 120}},
     "ep=16 does not divide the 120 experts"),
    ({"parallel": {"tp": 1, "pp": 8, "cp": 1, "ep": 2}}, "pp=8 does not divide the 52 layers"),
    ({"parallel": {"tp": 16, "pp": 1, "cp": 1, "ep": 1}}, "tp=16 does not divide the 8 Mamba groups"),
    ({"parallel": {"tp": 2, "pp": 1, "cp": 1, "ep": 2, "sequence_parallel": False}}, "needs sequence_parallel"),
    ({"global_batch_size": 100}, "global_batch_size=100 is not a multiple of micro_batch_size x DP = 1x16"),
    ({"parallel": {"tp": 1, "pp": 1, "cp": 16, "ep": 1}, "model": {"mamba_num_heads": 24}},
     "cp=16 does not divide the 24 Mamba heads per TP rank"),
    ({"parallel": {"tp": 1, "pp": 1, "cp": 16, "ep": 1}, "seq_length": 4112}, "seq_length=4112 must be divisible by 2 x CP"),
])
def test_impossible_layouts_fail_before_any_job(params, change, message):
    params["model"]["overrides"] = change.pop("model", {})
    with pytest.raises(UserError) as err:
        build_plan(production(params, **change), stages=("train",))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_recipe_layouts_are_valid(params):
    p = production(params)
    assert layout_errors(read_layout(p, "train"), model_preset(p.settings.model)) == []
    p["lc"].update(nodes=32, gpus_per_node=8, seq_length=524288, global_batch_size=48, micro_batch_size=1,
                   parallel={"tp": 8, "pp": 4, "cp": 8, "ep": 8, "sequence_parallel": True})
    assert layout_errors(read_layout(p, "lc"), model_preset(p.settings.model)) == []  # the recipe's CP/TP/EP 8, PP 4


def test_checkpoint_staging_matches_the_2x_h200_measurements(params):
    """The reduced Nano 3 on 2 H200s (docs/benchmarks.md): a torch_dist save grew each rank's pinned host memory
    by 22.1-22.7 GiB, at 4k with DP 2 and at 64k with CP 2 (the rank's shared mappings before and after the
    save). Counting the weights and the optimizer shard alone (15.8 GiB) left the host plan 30% short."""
    from nano3.train.plan import estimate_host_memory

    p = production(params, nodes=1, gpus_per_node=2, global_batch_size=2, micro_batch_size=1,
                   parallel={"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1})
    p["model"]["overrides"] = {"hybrid_layer_pattern": "MEM*E", "num_moe_experts": 64}
    preset, layout = model_preset(p.settings.model), read_layout(p, "train")
    for seq, cp in ((4096, 1), (65536, 2)):
        at = dataclasses.replace(layout, seq_length=seq, cp=cp)
        staged = estimate_host_memory(at, estimate_memory(at, preset, 131072, recompute_moe=False), 4).checkpoint_gib
        assert staged == pytest.approx(22.4, rel=0.05)


def test_memory_estimate_matches_the_h100_measurement(params):
    """The bench's reduced Nano (5 layers `MEM*E`, 64 experts, seq 4096, one GPU, BF16) on an H100
    (docs/benchmarks.md): the allocator's peak grew 13.4 GiB from micro-batch 2 to 4 (46.0 -> 59.4 GiB), and
    nvidia-smi showed the process holding 73.2 GB = 68.2 GiB at micro-batch 4. The plan's total is what the card
    must hold (allocator cache and CUDA context included)."""
    p = production(params, nodes=1, gpus_per_node=1, global_batch_size=16,
                   parallel={"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1})
    p["model"]["overrides"] = {"hybrid_layer_pattern": "MEM*E", "num_moe_experts": 64}
    preset, layout = model_preset(p.settings.model), read_layout(p, "train")
    mbs2, mbs4 = (estimate_memory(dataclasses.replace(layout, micro_batch_size=m), preset, 131072, recompute_moe=False,
                                  cross_entropy="native") for m in (2, 4))  # what that run used
    assert mbs4.activations_gib - mbs2.activations_gib == pytest.approx(59.4 - 46.0, rel=0.1)
    assert mbs4.total_gib == pytest.approx(68.2, rel=0.05)


# `bench/train_throughput.py --scale long` on 2 H200s (docs/benchmarks.md): the reduced Nano 3 at micro-batch 1
# (4 where noted), DP 2 below 64k and CP 2 from 64k; (seq, micro-batch, MoE recompute, cross entropy): allocated and
# reserved peak, GiB (`torch.cuda.max_memory_allocated` / `max_memory_reserved`; None: not recorded).
LONG_CONTEXT_RUNS = {
    (4096, 1, False, "te"): (24.8, 25.95), (16384, 1, False, "te"): (35.5, 37.74),
    (65536, 1, False, "te"): (50.89, 59.21), (131072, 1, False, "te"): (81.65, 89.92),
    (4096, 4, False, "te"): (35.51, 39.48), (65536, 1, True, "te"): (44.92, 55.86),
    (196608, 1, True, "te"): (94.53, 117.14),
    (4096, 1, False, "native"): (None, 28.9), (65536, 1, False, "native"): (74.9, 83.2),
    (4096, 4, False, "native"): (47.5, 55.5), (16384, 1, True, "native"): (44.5, 53.4),
}


def test_memory_estimate_matches_the_2x_h200_long_context_measurements(params):
    """Issue 13 asks the plan to be within 5% of the reserved peak at each length. The tensors (allocated) are
    within 2% at every run; the allocator's cache above them varied by run (13-44% of the activations), so the
    reserved estimate is within 5% at 4k, 16k, 64k and 128k and within 10% at every run."""
    p = production(params, nodes=1, gpus_per_node=2, global_batch_size=2, micro_batch_size=1,
                   parallel={"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1})
    p["model"]["overrides"] = {"hybrid_layer_pattern": "MEM*E", "num_moe_experts": 64}
    preset, layout = model_preset(p.settings.model), read_layout(p, "train")
    for (seq, mbs, recompute, ce), (allocated, reserved) in LONG_CONTEXT_RUNS.items():
        at = dataclasses.replace(layout, seq_length=seq, cp=2 if seq >= 65536 else 1, micro_batch_size=mbs,
                                 global_batch_size=8 if mbs == 4 else 2)
        plan = estimate_memory(at, preset, 131072, recompute_moe=recompute, cross_entropy=ce)
        if allocated is not None:
            assert plan.allocated_gib == pytest.approx(allocated, rel=0.02), (seq, mbs, recompute, ce)
        issue_lengths = mbs == 1 and not recompute and ce == "te"
        assert plan.reserved_gib == pytest.approx(reserved, rel=0.05 if issue_lengths else 0.10), (seq, mbs, ce)
        assert plan.total_gib - plan.reserved_gib == 1.5  # the CUDA context, outside the allocator


# The lc GPU test's tiny model (tests/gpu/test_long_context_gpu.py; vocab 8192, TE cross entropy, expandable
# segments, global batch 2, micro-batch 1): (seq, CP) -> allocated and reserved peak, GiB (None: not recorded).
TINY_LC_RUNS = {(65536, 1): (5.96, 6.11),  # 1x H200, docs/benchmarks.md "Fourth run"
                (131072, 2): (None, 6.29)}  # 2x H200, "Third run"


def test_memory_estimate_is_an_upper_bound_for_the_tiny_model(params):
    """The plan is calibrated on the real widths; on the tiny model its fixed terms make it high. It must stay an
    upper bound there (a plan below the real peak lets a run start that then runs out of memory) and not so high
    that it refuses lengths the GPU runs: within 1.5x of what the lc test measured."""
    params["model"]["vocab_size"] = 8192
    for (seq, cp), (allocated, reserved) in TINY_LC_RUNS.items():
        params["lc"].update(seq_length=seq, tokens=12 * 2 * seq, global_batch_size=2, micro_batch_size=1,
                            gpus_per_node=cp, parallel={**params["lc"]["parallel"], "cp": cp})
        memory = build_plan(params, stages=("lc",)).stages["lc"].memory
        if allocated is not None:
            assert allocated <= memory.allocated_gib <= 1.5 * allocated, (seq, cp, memory.allocated_gib)
        assert reserved <= memory.reserved_gib <= 1.5 * reserved, (seq, cp, memory.reserved_gib)


def test_host_memory_per_rank_grows_linearly_with_the_sequence(params):
    """Issue 13: host memory must not grow as seq^2 (the attention mask mapping.py turns off); a rank holds its
    process, its data-loader workers' batches and, while saving, its checkpoint shard."""
    from nano3.train.plan import HOST_RANK_GIB, estimate_host_memory

    p = production(params)
    preset, layout = model_preset(p.settings.model), read_layout(p, "train")
    memory = estimate_memory(layout, preset, 131072, recompute_moe=True)
    at = {seq: estimate_host_memory(dataclasses.replace(layout, seq_length=seq), memory, workers=2)
          for seq in (4096, 65536, 131072)}
    growth = [at[65536].loader_gib - at[4096].loader_gib, at[131072].loader_gib - at[65536].loader_gib]
    assert growth[1] == pytest.approx(2 * growth[0] * (131072 - 65536) / (2 * (65536 - 4096)), rel=1e-9)
    assert at[131072].loader_gib < 1.1  # 2 workers x 2 batches x 128k x 28 bytes + the workers' own pages
    assert at[4096].checkpoint_gib == pytest.approx(1.4427 * (memory.weights_gib + memory.optimizer_gib), rel=1e-4)
    assert at[4096].total_gib > HOST_RANK_GIB + at[4096].checkpoint_gib
    plan = build_plan(p, stages=("train",))
    assert plan.as_dict()["stages"]["train"]["host_memory_gib"]["total_gib"] == pytest.approx(
        estimate_host_memory(layout, plan.stages["train"].memory, p.settings.train.num_workers).total_gib)


def test_pipeline_stages_hold_their_own_microbatches_and_only_the_last_holds_the_logits(params):
    """1F1B: the first stage keeps PP microbatches of its layers, the last keeps one plus the output layer's logits
    and their gradient. The estimate is the busiest stage's, so the vocabulary (which sizes the logits) moves it
    only where the last stage is the busiest."""
    p = production(params)
    p["lc"].update(nodes=32, gpus_per_node=8, seq_length=1048576, global_batch_size=48, micro_batch_size=1,
                   parallel={"tp": 8, "pp": 4, "cp": 8, "ep": 8, "sequence_parallel": True})
    preset, layout = model_preset(p.settings.model), read_layout(p, "lc")

    def activations(vocab, **change):
        return estimate_memory(dataclasses.replace(layout, **change), preset, vocab, recompute_moe=True).activations_gib

    assert activations(131072) == pytest.approx(activations(65536))  # the first stage is the busiest
    assert activations(16 * 131072) > activations(131072)  # logits so large that the last stage is
    no_pp = activations(131072, pp=1)
    assert no_pp > activations(131072) > 0.5 * no_pp  # the logits leave stage 0; its 4 x 1/4 of the layers stay
    one_microbatch = activations(131072, global_batch_size=8)  # DP 1: 8 microbatches
    assert one_microbatch == pytest.approx(activations(131072))
    single = activations(131072, global_batch_size=1)  # one microbatch: a quarter of the layers on every stage,
    assert activations(65536, global_batch_size=1) < single < activations(131072)  # and the logits on the last


def test_the_plan_counts_the_cross_entropy_that_will_run(params):
    """The Megatron path runs TE's cross entropy (4 bytes x vocab per token at the loss) unless
    train.bridge_overrides picks megatron-core's native one (10); anything else stops the plan in one line."""
    p = production(params)
    p["model"]["vocab_size"] = 131072
    te = build_plan(p, stages=("train",)).stages["train"]
    p["train"]["bridge_overrides"] = {"model.cross_entropy_fusion_impl": "native"}
    native = build_plan(p, stages=("train",)).stages["train"]
    tokens = te.layout.micro_batch_size * te.layout.seq_length / te.layout.cp
    assert te.layout.pp == 1  # the output layer's activations are on the (only) busiest stage
    extra = 6 * 131072 / te.layout.tp * tokens / 2**30  # native: bf16 logits, fp32 copy, fp32 softmax; TE: fp32 grad
    assert native.memory.activations_gib - te.memory.activations_gib == pytest.approx(extra, rel=0.01)
    p["train"]["bridge_overrides"] = {"model.cross_entropy_fusion_impl": "apex"}
    with pytest.raises(UserError, match=r"cross_entropy_fusion_impl='apex': megatron-core knows native and te$"):
        build_plan(p, stages=("train",))


def test_memory_estimate_shrinks_with_expert_parallelism(params):
    p = production(params)
    preset, layout = model_preset(p.settings.model), read_layout(p, "train")
    ep8 = estimate_memory(layout, preset, 131072, recompute_moe=True)
    ep1 = estimate_memory(dataclasses.replace(layout, ep=1), preset, 131072, recompute_moe=True)
    assert ep1.weights_gib > 50 > ep8.weights_gib  # 31.6B bf16 weights do not fit one 80 GB GPU without EP
    assert 30 < ep8.total_gib < 80


def test_mapping_emits_only_fields_bridge_has(params, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.config import (
        CheckpointConfig,
        LoggerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )

    def names(*classes):
        return {f.name for c in classes for f in dataclasses.fields(c)}

    known = {
        "model": names(TransformerConfig) | {"hybrid_layer_pattern", "seq_length", "make_vocab_size_divisible_by",
                                             "moe_flex_dispatcher_backend"},
        "train": names(TrainingConfig), "validation": names(ValidationConfig), "optimizer": names(OptimizerConfig),
        "scheduler": names(SchedulerConfig), "checkpoint": names(CheckpointConfig), "logger": names(LoggerConfig),
        "rng": names(RNGConfig), "ddp": names(DistributedDataParallelConfig),
        "tokenizer": names(TokenizerConfig) | {"use_tokenizer_vocab_size"},
        "dataset": names(GPTDatasetConfig) | {"seq_length", "num_workers", "per_split_data_args_path"},
    }
    params["wandb"]["enabled"] = True
    s = build_schedule(params.settings)
    for phase in s.phases:
        o = bridge_overrides(params, s, phase, str(tmp_path / "run"), pretrained="x" if phase.name == "lc" else None)
        for key in o:
            section, _, field = key.partition(".")
            if section in ("mixed_precision", "comm_overlap"):
                continue
            assert field in known[section], f"{key} is not a field of Bridge's {section} config"
    p1 = bridge_overrides(params, s, s.phase("phase1"), "run")
    p2 = bridge_overrides(params, s, s.phase("phase2"), "run")
    lc = bridge_overrides(params, s, s.phase("lc"), "lcrun", pretrained="run")
    assert p1["train.exit_interval"] == s.switch_iter and p2["train.exit_interval"] is None
    assert p1["train.train_iters"] == p2["train.train_iters"] == s.pretrain_iters
    assert p1["dataset.per_split_data_args_path"].endswith("phase1.json")
    assert p2["dataset.per_split_data_args_path"].endswith("phase2.json")
    assert p1["scheduler.lr_decay_style"] == "WSD" and lc["scheduler.lr_decay_style"] == "constant"
    assert p1["scheduler.lr_wsd_decay_iters"] == s.pretrain_iters - s.pretrain_lr.decay_start_iter
    assert lc["checkpoint.pretrained_checkpoint"] == "run" and lc["model.seq_length"] == params["lc"]["seq_length"]
    assert p1["tokenizer.tokenizer_type"] == "SentencePieceTokenizer"
    assert p1["model.hybrid_layer_pattern"] == PRESETS["tiny"].hybrid_layer_pattern


def test_speed_settings_map_to_bridges_recipes_and_fields(params):
    """Issue 34's knobs: the FP8 scaling recipes Bridge registers, its first/last-layer BF16 switch, and CUDA graphs
    with TE's RNG tracker (megatron-core refuses graphs without it)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.config import RNGConfig

    s = build_schedule(params.settings)
    base = bridge_overrides(params, s, s.phase("phase1"), "run")
    assert base["mixed_precision"] == "bf16_mixed" and "mixed_precision.first_last_layers_bf16" not in base
    assert "rng.te_rng_tracker" not in base and base["model.cuda_graph_modules"] == []
    names, edges = {}, {}
    for precision in ("fp8", "fp8_delayed", "fp8_blockwise", "mxfp8"):
        params["train"]["precision"] = precision
        o = bridge_overrides(params, s, s.phase("phase1"), "run")
        names[precision], edges[precision] = o["mixed_precision"], o.get("mixed_precision.first_last_layers_bf16")
    # the knob's default holds for every recipe (Bridge's delayed and blockwise recipes quantize the edges)
    assert set(edges.values()) == {True}
    assert names == {"fp8": "bf16_with_fp8_current_scaling_mixed", "fp8_delayed": "bf16_with_fp8_delayed_scaling_mixed",
                     "fp8_blockwise": "bf16_with_fp8_subchannel_scaling_mixed", "mxfp8": "bf16_with_mxfp8_mixed"}
    params["train"]["precision"] = "fp8"
    params["train"]["fp8_edge_layers_bf16"] = False
    params["train"]["kernels"]["cuda_graphs"] = "transformer_engine"
    o = bridge_overrides(params, s, s.phase("phase1"), "run")
    assert list(o).index("mixed_precision.first_last_layers_bf16") > list(o).index("mixed_precision")  # set after
    assert o["mixed_precision.first_last_layers_bf16"] is False
    assert o["model.use_te_rng_tracker"] is o["rng.te_rng_tracker"] is True
    assert {"use_te_rng_tracker"} <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert {"te_rng_tracker"} <= {f.name for f in dataclasses.fields(RNGConfig)}
    assert run_digest(params, "pretrain", {}) == run_digest(load_params(params.source), "pretrain", {})  # speed only


def test_bridge_fields_are_explicit_on_the_command_line(params):
    """`bridge.<section>.<field>` goes to Bridge; everything else is a params.yaml key, checked on load."""
    ours, bridge = split_cli_overrides(["train.lr=3e-4", "bridge.model.recompute_granularity=full", "prep.workers=3",
                                        "bridge.train.manual_gc=false", "model.vocab_size=131072"])
    assert ours == ["train.lr=3e-4", "prep.workers=3", "model.vocab_size=131072"]
    assert bridge == ["model.recompute_granularity=full", "train.manual_gc=false"]
    with pytest.raises(UserError, match=r"^override 'model.recompute_granularity': params.yaml has no such key; "
                                        r"a Megatron-Bridge field is written bridge.model.recompute_granularity$"):
        load_params(params.source, ["model.recompute_granularity=full"])
    with pytest.raises(UserError, match=r"did you mean 'train.lr'\?"):
        load_params(params.source, ["train.lrr=3e-4"])
    with pytest.raises(UserError, match=r"^override 'train.train_iters=50': nano3 sizes a run in tokens; set train.tokens"):
        split_cli_overrides(["train.train_iters=50"])
    with pytest.raises(UserError, match=r"^override 'bridge.modle.x=1': Megatron-Bridge fields are bridge.<section>"):
        split_cli_overrides(["bridge.modle.x=1"])


def test_stage_owned_bridge_fields_are_refused_on_the_command_line_and_in_params(params):
    """The recipe document's `checkpoint.save=/path` must not send checkpoints where resume never looks."""
    ours, bridge = split_cli_overrides(["bridge.checkpoint.save_interval=10"])
    assert ours == [] and bridge == ["checkpoint.save_interval=10"]
    with pytest.raises(UserError, match=r"^override 'bridge.checkpoint.load=/x': the stage resumes from its own run"):
        split_cli_overrides(["bridge.checkpoint.load=/x"])
    with pytest.raises(UserError, match=r"^override 'bridge.checkpoint.save=/x': checkpoints go to train.checkpoint_dir"):
        split_cli_overrides(["bridge.checkpoint.save=/x"])
    with pytest.raises(UserError, match=r"^override 'checkpoint.save': params.yaml has no such key"):
        load_params(params.source, ["checkpoint.save=/lustre/ck"])
    s = build_schedule(params.settings)
    params["train"]["bridge_overrides"] = {"checkpoint.save": "/elsewhere"}
    with pytest.raises(UserError, match="train.bridge_overrides.checkpoint.save: checkpoints go to train.checkpoint_dir"):
        bridge_overrides(params, s, s.phase("phase1"), "run")


def test_each_phase_index_is_sized_to_what_the_phase_reads(params):
    """Phase 2 of the recipe reads 44,703 steps x 8,192 = 366M samples; its index was built for all 6.1B."""
    from nano3.data.megatron import split_sizes
    from nano3.train.entry import PhaseWindow

    s = build_schedule(load_params(ROOT / "configs" / "nano3.yaml").settings)
    p1, p2 = s.phase("phase1"), s.phase("phase2")
    assert split_sizes(p2, 1000, 10)[0] == p2.samples == (745_058 - 700_355) * 8192 == 366_206_976
    assert split_sizes(p1, 1000, 10)[0] == 700_355 * 8192 and p2.sample_offset == 700_355 * 8192
    assert split_sizes(p2, 1000, 10)[1:] == split_sizes(p1, 1000, 10)[1:] == [(745_058 // 1000 + 1) * 10 * 8192,
                                                                              10 * 8192]
    window = PhaseWindow(list(range(100, 110)), offset=50)  # Megatron's sampler starts at consumed = 50
    assert len(window) == 60 and window[50] == 100 and window[59] == 109


def test_checkpoint_retention_maps_to_bridge_and_production_keeps_four(params):
    s = build_schedule(params.settings)
    assert bridge_overrides(params, s, s.phase("phase1"), "run")["checkpoint.most_recent_k"] == -1  # null: all
    params["train"]["keep_checkpoints"] = 3
    assert bridge_overrides(params, s, s.phase("phase1"), "run")["checkpoint.most_recent_k"] == 3
    params["train"]["keep_checkpoints"] = 0
    with pytest.raises(UserError, match="'train.keep_checkpoints' must be > 0, got 0"):
        bridge_overrides(params, s, s.phase("phase1"), "run")
    assert load_params(ROOT / "configs" / "nano3.yaml")["train"]["keep_checkpoints"] == 4


def test_model_vocab_smaller_than_the_tokenizers_is_refused(params):
    from nano3.train.plan import model_vocab

    assert model_vocab(params) == 4096  # the test tokenizer's
    params["model"]["vocab_size"] = 131072
    assert model_vocab(params) == 131072
    params["model"]["vocab_size"] = 4000
    with pytest.raises(UserError, match="model.vocab_size=4000 is smaller than the tokenizer's 4096 ids"):
        build_plan(params, stages=("train",))


def test_run_digest_changes_with_what_is_learned_only(params):
    base = run_digest(params, "pretrain", {"phase1": "a"})
    params["train"]["log_interval"] = 1
    params["train"]["gpus_per_node"] = 8
    assert run_digest(params, "pretrain", {"phase1": "a"}) == base  # operational: resume the same run
    params["train"]["lr"] = 3e-4
    assert run_digest(params, "pretrain", {"phase1": "a"}) != base
    params["train"]["lr"] = load_params(ROOT / "params.yaml")["train"]["lr"]
    assert run_digest(params, "pretrain", {"phase1": "b"}) != base  # a different blend is a different run


def test_dry_run_stage_prints_the_plan_and_writes_json(tmp_path, spm_dir):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "stages" / "pretrain.py"), "--params", str(ROOT / "params.yaml"),
                          "--dry-run", f"tokenizer.dir={spm_dir}", "train.backend=megatron"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "phase1 1..188, phase2 189..200" in out.stdout and "megatron (Megatron-Bridge on GPUs)" in out.stdout
    plan = json.loads((tmp_path / "reports" / "plan" / "pretrain.json").read_text())
    assert plan["schedule"]["switch_iter"] == 188 and plan["model"]["preset"] == "tiny"
    bad = subprocess.run([sys.executable, str(ROOT / "stages" / "pretrain.py"), "--dry-run", f"tokenizer.dir={spm_dir}",
                          "--params", str(ROOT / "params.yaml"), "train.parallel.ep=3", "train.backend=megatron"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.parallel") and "Traceback" not in bad.stderr


def test_the_plan_warns_about_unpinned_hub_data_and_strict_refuses_it(tmp_path, spm_dir):
    """Issue 31: a hub dataset without a revision reads whatever the Hub holds when prep runs. `make plan` warns;
    `make plan STRICT=1` (`--strict`) refuses in one line; a pinned revision passes both."""
    import subprocess
    import sys

    def plan(revision: str, *flags: str):
        hub = "{source: hf://nvidia/Nemotron-CC-v2/High-Quality, watch: params.yaml" + revision + "}"
        cmd = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--params", str(ROOT / "params.yaml"),
               "--dry-run", *flags, f"tokenizer.dir={spm_dir}", f"datasets.cc-hq={hub}"]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)

    warned = plan("")
    assert warned.returncode == 0, warned.stderr
    assert "warning: 1 hub dataset(s) without a revision (cc-hq): prep reads whatever the Hub holds" in warned.stdout
    refused = plan("", "--strict")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().startswith("error: 1 hub dataset(s) without a revision (cc-hq)")
    assert refused.stderr.strip().endswith("(--strict)") and "\n" not in refused.stderr.strip()
    pinned = plan(", revision: 0123456789abcdef0123456789abcdef01234567", "--strict")
    assert pinned.returncode == 0 and "without a revision" not in pinned.stdout + pinned.stderr, pinned.stderr


def test_dry_run_refuses_a_cluster_whose_nodes_lack_the_host_memory(tmp_path, spm_dir):
    """`make plan CLUSTER=...` checks the ranks of a node against the profile's host_memory_gib, in one line."""
    import os
    import subprocess
    import sys

    profiles = tmp_path / "clusters.toml"
    profiles.write_text('[small]\naccount = ""\npartition = "p"\nnodes = 1\ngpus_per_node = 8\ncpus_per_task = 8\n'
                        'runtime = "none"\nhost_memory_gib = 16\n')
    env = {**os.environ, "CLUSTER": "small", "NANO3_CLUSTERS": str(profiles)}
    cmd = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--params", str(ROOT / "params.yaml"), "--dry-run",
           f"tokenizer.dir={spm_dir}", "train.backend=megatron", "train.micro_batch_size=1", "train.nodes=1",
           "train.gpus_per_node=8"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip()
    assert line.startswith("error: train: the plan estimates") and "GiB of host memory per rank" in line
    assert "ranks of a node, but a node of cluster 'small' (host_memory_gib) has 16 GiB" in line and "\n" not in line
    profiles.write_text(profiles.read_text().replace("host_memory_gib = 16", "host_memory_gib = 512"))
    fits = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert fits.returncode == 0, fits.stderr


def test_dry_run_on_a_cpu_machine_plans_the_backend_that_will_run(tmp_path, spm_dir):
    """`make plan` where `make pretrain` would train the CPU reference budget plans that budget, and says so."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "pretrain.py"), "--params", str(ROOT / "params.yaml"),
                          "--dry-run", f"tokenizer.dir={spm_dir}"], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "reference (this machine has no CUDA GPU" in out.stdout and "phase1 1..45, phase2 46..48" in out.stdout
    plan = json.loads((tmp_path / "reports" / "plan" / "pretrain.json").read_text())
    assert plan["backend"] == "reference" and plan["schedule"]["pretrain_iters"] == 48


def test_a_layout_over_the_gpus_memory_fails_with_layouts_that_fit(params):
    """The production layout on one node (85.2 GiB) and LC at 1M without pipeline parallelism (86.2 GiB) do not
    fit an 80 GB card: the plan refuses them in one line, with the nearest layouts that fit."""
    from nano3.train.plan import DEFAULT_GPU_MEMORY_GIB

    h100 = (DEFAULT_GPU_MEMORY_GIB, "an H100 80GB")
    p = load_params(ROOT / "configs" / "nano3.yaml")
    p["train"]["nodes"] = 1
    with pytest.raises(UserError) as err:
        build_plan(p, stages=("train",), gpu_memory=h100)
    message = str(err.value)
    assert message.startswith("train: the plan estimates 85.2 GiB per GPU") and "an H100 80GB has 79.6 GiB" in message
    assert "nearest layouts that fit: train.parallel." in message and "\n" not in message
    first_fit = message.split("fit: ")[1].split(" (")[0]  # apply the first suggestion: it must plan and fit
    for key_value in first_fit.split():
        key, value = key_value.split("=")
        *parents, last = key.split(".")
        node = p
        for part in parents:
            node = node[part]
        node[last] = value == "true" if value in ("true", "false") else int(value)
    assert build_plan(p, stages=("train",), gpu_memory=h100).stages["train"].memory.total_gib <= 79.6
    p["train"]["parallel"]["tp"] = 1
    assert build_plan(p, stages=("train",), gpu_memory=(139.8, "an H200"))  # the 1-node layout fits an H200  # fits there

    lc = load_params(ROOT / "configs" / "nano3.yaml", ["lc.parallel.tp=8", "lc.parallel.cp=8"])  # the recipe's
    lc["lc"]["seq_length"] = 1048576
    lc["lc"]["parallel"]["pp"] = 1
    with pytest.raises(UserError, match=r"lc: the plan estimates 86.2 GiB .* nearest layouts that fit: lc\.parallel\.pp=4 "):
        build_plan(lc, stages=("lc",), gpu_memory=h100)
    lc["lc"]["parallel"]["pp"] = 4  # the recipe's layout
    assert build_plan(lc, stages=("lc",), gpu_memory=h100).stages["lc"].memory.total_gib < 79.6
    assert build_plan(load_params(ROOT / "configs" / "nano3.yaml"), gpu_memory=h100)  # the production config fits


def test_lc_run_identity_follows_pretrains_checkpoint_not_its_throughput(params, tmp_path):
    """pretrain.json carries wall-clock throughput; a pretrain rerun to the same run and iteration (same weights)
    must leave lc in the same run directory, a different pretrain iteration must not."""
    from nano3.train.rundir.identity import upstream_digests

    (tmp_path / "blend").mkdir()
    (tmp_path / "blend" / "lc.json").write_text("{}")
    params["train"]["checkpoint_dir"] = str(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    manifest = tmp_path / "ck" / "pretrain.json"

    def lc_identity(**fields) -> dict:
        doc = {"digest": "4b983e74a537", "iteration": 48, "backend": "reference",
               "metrics": {"perf": {"tokens_per_s_per_gpu": 120.4}}} | fields
        manifest.write_text(json.dumps(doc))
        return run_digest(params, "lc", upstream_digests(params, "lc"))

    first = lc_identity()
    assert lc_identity(metrics={"perf": {"tokens_per_s_per_gpu": 145.4}}) == first
    assert lc_identity(iteration=40) != first and lc_identity(digest="0123456789ab") != first


def test_production_lc_layouts_say_which_fit_and_what_would(tmp_path):
    """The recipe's LC layout (TP 8 PP 4 CP 8 EP 8) at 512k on 256 GPUs and 1M on 512: the planner's estimate,
    whether it fits the card, and alternatives that the same estimate says fit."""
    from nano3.train.plan import production_lc_layouts

    params = load_params(ROOT / "configs" / "nano3.yaml", [f"tokenizer.dir={tmp_path}"])
    h100 = {r["seq_length"]: r for r in production_lc_layouts(params, 79.6)}
    assert h100[524288]["fits"] and h100[524288]["gpus"] == 256 and not h100[524288]["alternatives"]
    assert h100[1048576]["fits"] and h100[1048576]["gpus"] == 512 and not h100[1048576]["alternatives"]
    assert h100[524288]["gib"] < h100[1048576]["gib"] < 79.6
    tight = {r["seq_length"]: r for r in production_lc_layouts(params, 62.0)}  # a card too small for 1M as laid out
    assert not tight[1048576]["fits"] and tight[1048576]["alternatives"]
    assert all(gib <= 62.0 for _, gib in tight[1048576]["alternatives"])
    # TP x CP cannot pass the 64 Mamba heads, so at 1M no layout brings a rank's activations under ~60 GiB
    assert not any(r["alternatives"] for r in production_lc_layouts(params, 50.0) if not r["fits"])
    assert all(r["fits"] for r in production_lc_layouts(params, 139.8))  # an H200 holds both


def test_tp_above_the_kv_groups_is_refused_where_the_stack_cannot_split_them(monkeypatch):
    """Issue 32: the recipe image's megatron-core divides the KV groups by TP and asserts, so the production lc
    layout (TP 8 on 2 groups) builds on today's stack only. Read from the installed code, or declared by the
    profile of the image that runs it; refused in one line naming the nearest layouts that build and fit."""
    from nano3.config.clusters import get_profile
    from nano3.launch.slurm import build_request
    from nano3.megatron_compat import tp_splits_kv_groups

    assert tp_splits_kv_groups() is True  # the installed megatron-core (0.19.2)
    older = "self.num_query_groups_per_partition = divide(self.config.num_query_groups, world_size)"
    assert tp_splits_kv_groups(older) is False
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "megatron", None)  # no megatron at all (the image stand-in: it crashed the plan)
    assert tp_splits_kv_groups() is None
    monkeypatch.undo()
    params = load_params(ROOT / "configs" / "nano3.yaml", ["lc.parallel.tp=8", "lc.parallel.cp=8"])  # the recipe's
    assert build_plan(params, stages=("lc",)).stages["lc"].layout.tp == 8  # builds on today's stack
    with pytest.raises(UserError) as err:
        build_plan(params, stages=("lc",), tp_above_kv_groups=False)
    message = str(err.value)
    assert message.startswith("lc.parallel.tp=8 is above the 2 KV groups, which the stack that runs it cannot split")
    assert "nearest layouts that build there and fit: lc.parallel.tp=2 lc.parallel.cp=32 (" in message
    assert "\n" not in message
    fixed = load_params(ROOT / "configs" / "nano3.yaml")  # production's lc layout is the first that builds there
    assert (fixed["lc"]["parallel"]["tp"], fixed["lc"]["parallel"]["cp"]) == (2, 32)
    assert build_plan(fixed, stages=("lc",), tp_above_kv_groups=False).stages["lc"].memory.total_gib < 79.6
    profile = get_profile("example-pyxis", ROOT / "stages" / "clusters.toml")  # the recipe image
    assert profile.tp_above_kv_groups is False
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the gated datasets' check passes; this is about the layout
    with pytest.raises(UserError, match=r"^lc\.parallel\.tp=8 is above the 2 KV groups"):
        build_request("lc", params, profile)
    build_request("lc", fixed, profile)
