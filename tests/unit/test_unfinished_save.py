"""A run whose last Bridge save was cut short resumes from its newest whole checkpoint (issue 13: on an H200 the
kill of the lc test landed between Bridge's trackers and its run_config.yaml; the resume died on a KeyError).
The run directories are laid out as Bridge 0.6.2 wrote them there (file names and order read from the device)."""

from __future__ import annotations

import pytest
import torch
import yaml

from nano3.train.rundir import TRACKER, latest_iteration
from nano3.train.rundir.repair import BRIDGE_TRACKER, RUN_CONFIG, TRAIN_STATE, set_aside_unfinished_save


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


def test_other_nodes_read_the_run_only_once_node_0_has_readied_it(tmp_path, monkeypatch):
    """Issue 30: node 0 may be setting a cut save aside while node 1 reads the tracker; node 1 waits for node 0's
    marker of this job and restart (a requeue waits anew), and says so in one line if it never comes."""
    import threading
    import time

    from nano3.errors import UserError
    from nano3.train import rundir

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run = tmp_path / "pretrain" / "0123abcd"
    waiter = threading.Thread(target=rundir.wait_for_node0, args=(run, 30, 0.05))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # node 1 holds back ...
    run.mkdir(parents=True)
    rundir.node0_ready(run).touch()  # ... until node 0 has the run in order
    waiter.join(5)
    assert not waiter.is_alive()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(UserError, match=r"node 0 of job 77 has not readied the run in 0 s \(ready.77.3 missing\)"):
        rundir.wait_for_node0(run, 0, 0.01)


def test_a_save_cut_before_its_trackers_is_set_aside_and_the_tracked_checkpoint_kept(tmp_path):
    """Seen on an H200: a SIGTERM to every process (as a preempted job gets it) killed Bridge's checkpoint writers
    in the middle of saving iteration 61; the trackers stayed at 50, the half-written iter_0000061 remained, and
    the resume would save iteration 61 into it again. It is set aside; 50 stays the resume point."""
    run = tmp_path / "pretrain" / "run"
    save(run, 50, whole(50))
    partial = run / "iter_0000061"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"cut")
    lines = []
    set_aside_unfinished_save(run, lines.append)
    assert latest_iteration(run) == 50 and (run / "iter_0000050" / RUN_CONFIG).exists()
    assert not partial.exists() and (run / "unfinished_iter_0000061" / "__0_0.distcp").read_bytes() == b"cut"
    assert len(lines) == 1 and "iter_0000061: written after the last tracked checkpoint (50)" in lines[0]
    set_aside_unfinished_save(run, lines.append)  # idempotent
    assert len(lines) == 1
