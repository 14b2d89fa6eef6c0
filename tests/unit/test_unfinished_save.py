"""A run whose last Bridge save was cut short resumes from its newest whole checkpoint (issue 13: on an H200 the
kill of the lc test landed between Bridge's trackers and its run_config.yaml; the resume died on a KeyError).
The run directories are laid out as Bridge 0.6.2 wrote them there (file names and order read from the device)."""

from __future__ import annotations

import torch
import yaml

from nano3.train.backends.megatron import BRIDGE_TRACKER, RUN_CONFIG, TRAIN_STATE, set_aside_unfinished_save
from nano3.train.rundir import TRACKER, latest_iteration


def bridge_config(iteration: int) -> dict:
    """A ConfigContainer as Bridge dumps it (yaml.safe_dump, sorted keys): its required sections, more besides."""
    model = {"_target_": "megatron.bridge.models.mamba.MambaModelProvider", "hidden_size": 2688,
             "mamba_num_heads": 64, "mamba_state_dim": 128, "num_layers": 52, "num_moe_experts": 128,
             "pipeline_model_parallel_size": 1, "seq_length": 65536, "tensor_model_parallel_size": 1,
             "virtual_pipeline_model_parallel_size": None}
    return {"_target_": "megatron.bridge.training.config.ConfigContainer",
            "checkpoint": {"fully_parallel_save": True, "save": "checkpoints/lc/run", "save_interval": 2,
                           "save_optim": True, "save_rng": True},
            "dataset": {"seq_length": 65536, "num_workers": 2}, "ddp": {"use_distributed_optimizer": True},
            "logger": {"log_interval": 1}, "model": model, "optimizer": {"lr": 1e-5, "weight_decay": 0.1},
            "rng": {"seed": 1234}, "scheduler": {"lr_decay_style": "constant"},
            "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer"},
            "train": {"global_batch_size": 2, "train_iters": 12 + iteration},
            "validation": {"eval_interval": 3, "eval_iters": 1}}


def save(run, iteration: int, config_text: str | None = None) -> None:
    """One checkpoint in Bridge's order: tensors, train_state.pt, the two trackers, then run_config.yaml (None: the
    kill came before it)."""
    ckpt = run / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(bytes([iteration]) * 4096)
    (ckpt / ".metadata").write_bytes(b"dcp metadata")
    torch.save({"step": torch.tensor(iteration), "consumed_train_samples": torch.tensor(2 * iteration)},
               ckpt / TRAIN_STATE)
    (run / BRIDGE_TRACKER).write_bytes((ckpt / TRAIN_STATE).read_bytes())
    (run / TRACKER).write_text(str(iteration))
    if config_text is not None:
        (ckpt / RUN_CONFIG).write_text(config_text)


def whole(iteration: int) -> str:
    return yaml.safe_dump(bridge_config(iteration))


def cut_in_model(iteration: int) -> str:
    """As on the H200: the file ends at a line boundary inside `model`, before tensor_model_parallel_size."""
    text = whole(iteration)
    return text[:text.index("  mamba_state_dim:")]


def tree(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_save_cut_short_is_set_aside_and_the_run_resumes_from_the_checkpoint_before(tmp_path):
    run = tmp_path / "lc" / "run"
    save(run, 2, whole(2))
    save(run, 4, cut_in_model(4))
    assert yaml.safe_load(cut_in_model(4))["checkpoint"]["save_rng"]  # parses: Bridge fails only on the missing keys
    cut_files = tree(run / "iter_0000004")
    said = []
    set_aside_unfinished_save(run, said.append)
    assert latest_iteration(run) == 2
    assert (run / BRIDGE_TRACKER).read_bytes() == (run / "iter_0000002" / TRAIN_STATE).read_bytes()
    assert torch.load(run / BRIDGE_TRACKER)["step"] == 2  # what Bridge reads first to pick the checkpoint
    assert not (run / "iter_0000004").exists()
    assert tree(run / "unfinished_iter_0000004") == cut_files  # kept whole, under a name no loader picks up
    assert said == [f"warning: {run / 'iter_0000004'}: run_config.yaml is cut short (no optimizer, scheduler, "
                    f"tokenizer, train, model.tensor_model_parallel_size, model.pipeline_model_parallel_size): the stage was stopped while Bridge saved it; resuming from "
                    f"iteration 2; kept as unfinished_iter_0000004 (remove it to free its space)"]


def test_a_first_save_cut_short_leaves_the_run_to_start_again(tmp_path):
    run = tmp_path / "run"
    save(run, 2, config_text=None)  # killed before the config was opened
    said = []
    set_aside_unfinished_save(run, said.append)
    assert latest_iteration(run) == 0
    assert not (run / BRIDGE_TRACKER).exists() and not (run / TRACKER).exists()
    assert sorted(p.name for p in run.iterdir()) == ["unfinished_iter_0000002"]
    assert "has no run_config.yaml" in said[0] and "resuming from the start" in said[0]


def test_a_config_cut_inside_a_value_or_empty_counts_as_unfinished(tmp_path):
    for name, text, reason in [("mid-value", whole(2)[:whole(2).index("save_interval") + 18] + "[1, 2",
                                "not valid YAML"), ("empty", "", "is empty")]:
        run = tmp_path / name
        save(run, 2, whole(2))
        save(run, 4, text)
        said = []
        set_aside_unfinished_save(run, said.append)
        assert latest_iteration(run) == 2 and reason in said[0], said


def test_whole_checkpoints_are_left_as_they_are(tmp_path):
    run = tmp_path / "run"
    save(run, 2, whole(2))
    save(run, 4, whole(4))
    before = tree(run)
    said = []
    set_aside_unfinished_save(run, said.append)
    set_aside_unfinished_save(tmp_path / "never-trained", said.append)
    assert tree(run) == before and said == []


def test_a_stage_killed_while_setting_aside_finishes_it_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    save(run, 2, whole(2))
    save(run, 4, whole(4))
    save(run, 6, cut_in_model(6))
    (run / "iter_0000006").rename(run / "unfinished_iter_0000006")  # the rename done, the trackers not yet
    said = []
    set_aside_unfinished_save(run, said.append)
    assert latest_iteration(run) == 4 and torch.load(run / BRIDGE_TRACKER)["step"] == 4
    assert "iter_0000006: is missing" in said[0] and "resuming from iteration 4" in said[0]
    assert (run / "unfinished_iter_0000006" / "__0_0.distcp").exists()
