"""Issue 11: the effective configuration and the conformance check, on the CPU.

The GPU side (Megatron's live optimizer and scheduler) is tests/gpu; here: the mapping sets what Bridge's
scheduler really applies, the check catches any value changed behind params.yaml's back in one line, and
the production config matches the recipe except for its listed deviations.
"""

from __future__ import annotations

import copy

import pytest

from nano3.config import Params, load_params
from nano3.errors import UserError
from nano3.schedule import build_schedule
from nano3.train import spec as phase_spec
from nano3.train.backends.training_run import for_backend
from nano3.train.conform import (
    assert_run_conforms,
    check_recipe,
    check_run,
    load_deviations,
    stale_listings,
)
from nano3.train.effective import expected, flatten, summarize_groups
from nano3.train.mapping import bridge_overrides
from tests.conftest import ROOT


@pytest.fixture
def params(tmp_path, spm_dir) -> Params:
    import json

    p = load_params(ROOT / "params.yaml")
    p["tokenizer"]["dir"] = str(spm_dir)
    p["blend"]["out_dir"] = str(tmp_path / "blend")
    (tmp_path / "blend").mkdir()
    for name in ("phase1", "phase2", "lc"):
        (tmp_path / "blend" / f"{name}.json").write_text(json.dumps(
            {"train": ["0.7", "d/a/train/shard_000000", "0.3", "d/b/train/shard_000000"],
             "valid": ["1.0", "d/a/valid/shard_000000"], "test": None}))
    return p


def test_bridge_scheduler_applies_the_params_weight_decay(params):
    """megatron-core's scheduler writes start/end_weight_decay into every group at every step; Bridge's recipe
    helper leaves them at 0.033. The mapping must set them from train.weight_decay (the GPU run read back 0.1)."""
    s = build_schedule(params.settings)
    for phase in s.phases:
        o = bridge_overrides(params, s, phase, "run", pretrained="x" if phase.name == "lc" else None)
        assert o["scheduler.start_weight_decay"] == o["scheduler.end_weight_decay"] == o["optimizer.weight_decay"] == 0.1
        assert o["scheduler.weight_decay_incr_style"] == "constant"
        assert o["optimizer.adam_eps"] == params["train"]["adam_eps"] and o["scheduler.lr_warmup_init"] == 0.0
        assert o["checkpoint.most_recent_k"] == -1  # params.yaml keeps every checkpoint
        assert o["model.init_method_std"] == 0.0173 and o["model.moe_router_enable_expert_bias"] is True


def spec_of(params, phase_name="phase1", backend="megatron", bridge_cli=None) -> dict:
    """The phase's spec as the stage writes it for the ranks (train.spec)."""
    params = for_backend(params, backend)
    phase = build_schedule(params.settings).phase(phase_name)
    return phase_spec.build(params, phase, "run", backend, "x" if phase_name == "lc" else None, bridge_cli)


def effective_like(params, phase_name="phase1", backend="megatron") -> tuple[dict, dict]:
    """An effective file as a conforming run writes it: what its spec expects, plus the raw groups."""
    spec = spec_of(params, phase_name, backend)
    doc = copy.deepcopy(expected(spec))
    doc["optimizer"]["groups"] = [{"lr": 0.0, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "params": 900},
                                  {"lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "params": 10}]
    return doc, spec


def test_a_conforming_run_passes_and_a_changed_value_fails_in_one_line(params):
    doc, spec = effective_like(params)
    assert check_run(doc, spec) == []
    doc["weight_decay_applied"]["first_step"] = 0.033  # the recipe helper's value, as Megatron would apply it
    doc["scheduler"]["start_weight_decay"] = 0.033
    with pytest.raises(UserError) as err:
        assert_run_conforms(doc, spec, "run/effective_config.phase1.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("run/effective_config.phase1.json: the run does not use")
    assert "weight_decay_applied.first_step: running 0.033, params 0.1" in message and "1 more" in message
    assert "configs/deviations.yaml" in message


def test_missing_values_are_differences_not_passes(params):
    """A reader that silently loses a field must fail the check, not pass it."""
    doc, spec = effective_like(params)
    del doc["moe"]["bias_update_rate"]
    assert [d.key for d in check_run(doc, spec)] == ["moe.bias_update_rate"]


def test_the_last_step_is_checked_after_the_run_but_not_at_start_up(params):
    doc, spec = effective_like(params)
    del doc["weight_decay_applied"]["last_step"]
    assert_run_conforms(doc, spec, "x")  # at start-up the last step has not run yet
    assert [d.key for d in check_run(doc, spec)] == ["weight_decay_applied.last_step"]


def test_the_ranks_environment_from_params_and_the_allocator_it_asked_for_are_checked(params):
    """params.yaml's train.env is what every rank must have had; and where the rank asked for expandable segments,
    its allocator must run them (a setting read after the allocator started would be silently ignored)."""
    params["train"]["env"] = {"NCCL_DEBUG": "WARN"}
    doc, spec = effective_like(params)
    assert doc["environment"] == {"NCCL_DEBUG": "WARN"} and check_run(doc, spec) == []
    doc["environment"]["NCCL_DEBUG"] = None  # the rank did not have it
    assert [d.key for d in check_run(doc, spec)] == ["environment.NCCL_DEBUG"]
    doc["environment"]["NCCL_DEBUG"] = "WARN"
    doc["allocator"] = {"asked": {"expandable_segments": True}, "expandable_segments": True}
    assert check_run(doc, spec) == []
    doc["allocator"]["expandable_segments"] = False
    with pytest.raises(UserError, match="allocator.expandable_segments: running False, params True"):
        assert_run_conforms(doc, spec, "x")
    assert "environment" not in expected(spec_of(params, backend="reference"))  # the CPU reference starts no ranks


def test_reference_backend_deviations_are_listed_and_nothing_else_passes(params):
    doc, spec = effective_like(params, backend="reference")
    doc.update(precision="float32")
    doc["moe"].update(aux_loss_type="none", aux_loss_coeff=0.0)
    diffs = check_run(doc, spec)
    assert {d.key for d in diffs} == {"precision", "moe.aux_loss_type", "moe.aux_loss_coeff"}
    assert all(d.reason for d in diffs)
    doc["optimizer"]["adam_beta2"] = 0.999
    with pytest.raises(UserError, match="optimizer.adam_beta2: running 0.999, params 0.95"):
        assert_run_conforms(doc, spec, "x")


def test_optimizer_groups_summarize_to_decayed_and_no_decay_settings():
    groups = [{"weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "params": 100},
              {"weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "params": 7},
              {"weight_decay": 0.5, "betas": [0.9, 0.95], "eps": 1e-8, "params": 0}]  # empty groups do not count
    s = summarize_groups(groups)
    assert (s["weight_decay"], s["no_decay_weight_decay"], s["adam_beta1"], s["adam_beta2"]) == (0.1, 0.0, 0.9, 0.95)
    assert (s["params_decayed"], s["params_not_decayed"]) == (100, 7)
    groups[1]["eps"] = 1e-6
    assert summarize_groups(groups)["adam_eps"] == [1e-8, 1e-6]  # disagreeing groups can never equal one value


def test_production_config_matches_the_recipe_except_listed_deviations():
    params = load_params(ROOT / "configs" / "nano3.yaml")
    diffs = check_recipe(params)
    # lc at TP 2 x CP 32: the recipe's TP 8 does not build on the recipe's own image (issue 32)
    assert {d.key for d in diffs} == {"pretrain.warmup_fraction", "lc.seq_length", "lc.tp", "lc.cp"}
    assert all(d.reason for d in diffs) and stale_listings(params, load_deviations()) == []
    params["train"]["weight_decay"] = 0.033
    params["lc"]["parallel"]["ep"] = 4
    bad = {d.key: d for d in check_recipe(params) if d.reason is None}
    assert set(bad) == {"pretrain.weight_decay", "lc.ep"}
    assert bad["pretrain.weight_decay"].line("ours", "recipe") == "pretrain.weight_decay: ours 0.033, recipe 0.1"


def test_a_listing_that_no_longer_deviates_is_reported():
    params = load_params(ROOT / "configs" / "nano3.yaml")
    params["lc"]["seq_length"] = 1048576
    assert stale_listings(params, load_deviations()) == ["lc.seq_length"]


def test_make_conform_checks_both_configs_and_the_runs(tmp_path, spm_dir):
    import subprocess
    import sys

    env_params = tmp_path / "params.yaml"
    env_params.write_text((ROOT / "params.yaml").read_text().replace("dir: data/tokenizer", f"dir: {spm_dir}"))
    out = subprocess.run([sys.executable, "-m", "nano3.train.conform", "--params", str(env_params)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "recipe vs" in out.stdout and "nano3.yaml (preset nano3): 0 unlisted, 4 intended" in out.stdout
    assert "runs: no training manifest" in out.stdout
    env_params.write_text(env_params.read_text().replace("weight_decay: 0.1", "weight_decay: 0.05"))
    out = subprocess.run([sys.executable, "-m", "nano3.train.conform", "--params", str(env_params)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: {env_params}: pretrain.weight_decay: ours 0.05, recipe 0.1")


def test_flatten_joins_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_the_spec_is_what_the_ranks_apply_and_what_the_read_back_checks(params, tmp_path):
    """Issue 35: one spec per phase. The ranks set its Bridge fields (params.yaml's, then the command line's); the
    read-back derives what it expects from the same file, so a command-line field that contradicts params.yaml
    (the recipe helper's weight decay forced back) is refused, and one params.yaml does not check passes."""
    spec = spec_of(params, bridge_cli={"scheduler.start_weight_decay": 0.033, "train.manual_gc": False})
    path = phase_spec.write(tmp_path, spec)
    assert path.name == "spec.phase1.json" and phase_spec.read(path) == spec
    applied = phase_spec.bridge_fields(phase_spec.read(path))
    assert applied["scheduler.start_weight_decay"] == 0.033 and applied["train.manual_gc"] is False
    assert applied["optimizer.lr"] == spec["bridge"]["optimizer.lr"] == params["train"]["lr"]
    assert phase_spec.phase_of(spec) == build_schedule(params.settings).phase("phase1")
    live = copy.deepcopy(expected(spec))  # a run that applied the forced value: the scheduler's start is 0.033
    live["scheduler"]["start_weight_decay"] = live["weight_decay_applied"]["first_step"] = 0.033
    with pytest.raises(UserError, match="weight_decay_applied.first_step: running 0.033, params 0.1"):
        assert_run_conforms(live, spec, str(path))
    spec["bridge"]["optimizer.adam_beta2"] = 0.999  # what params.yaml says is read from the spec, not params again
    assert "optimizer.adam_beta2: running 0.95, params 0.999" in [d.line("running", "params") for d in check_run(live, spec)]
