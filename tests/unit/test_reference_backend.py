"""The CPU reference backend's choice and budget, and the export/eval stages' input errors (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nano3.config import load_params
from nano3.errors import UserError
from nano3.schedule import build_schedule
from nano3.train.backends import for_backend, resolve_backend
from nano3.train.backends.reference import build_model
from nano3.train.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]


def test_auto_backend_is_the_reference_without_a_gpu_and_megatron_on_request():
    params = load_params(ROOT / "params.yaml")
    assert params.get_key("train.backend") == "auto"
    assert resolve_backend(params) == "reference"  # CI and this machine: no CUDA GPU
    assert resolve_backend(load_params(ROOT / "params.yaml", ["train.backend=megatron"])) == "megatron"
    with pytest.raises(UserError, match="'train.backend' must be one of auto \| megatron \| reference, got 'cpu'"):
        resolve_backend(load_params(ROOT / "params.yaml", ["train.backend=cpu"]))


def test_reference_budget_replaces_the_section_and_keeps_the_curriculum_shape():
    params = load_params(ROOT / "params.yaml")
    ref = for_backend(params, "reference")
    assert for_backend(params, "megatron") is params
    sched, ref_sched = build_schedule(params.settings), build_schedule(ref.settings)
    assert (ref.get_key("train.seq_length"), ref.get_key("train.global_batch_size")) == (256, 4)
    assert ref_sched.pretrain_iters == 48 and ref_sched.switch_iter == round(48 * 0.94)
    assert ref_sched.pretrain_lr.lr == sched.pretrain_lr.lr and ref_sched.pretrain_lr.decay_start_iter == round(48 * 0.8)
    assert ref.get_key("lc.seq_length") == 1024 and ref_sched.lc_iters == 4
    assert ref.get_key("train.parallel.ep") == 1 and params.get_key("train.seq_length") == 1024  # input untouched
    with pytest.raises(UserError, match=r"^override 'train.reference.lr': params.yaml has no such key"):
        load_params(ROOT / "params.yaml", ["train.reference.lr=1"])


def test_reference_refuses_the_full_model():
    params = for_backend(load_params(ROOT / "params.yaml", ["model.preset=nano3", "model.vocab_size=131072"]),
                         "reference")
    plan = build_plan(params, stages=("train",))
    with pytest.raises(UserError, match="CPU reference backend trains tiny presets only"):
        build_model(params, plan, None)


def stage(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), "--params", str(ROOT / "params.yaml"), *args],
                          cwd=cwd, capture_output=True, text=True)


def test_export_without_or_with_a_dangling_checkpoint_fails_in_one_line(tmp_path):
    out = stage("export.py", tmp_path, f"train.checkpoint_dir={tmp_path / 'ck'}")
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "run make lc" in out.stderr
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "lc.json").write_text(json.dumps({"stage": "lc", "checkpoint": str(tmp_path / "gone"),
                                                         "iteration": 32, "digest": "x"}))
    out = stage("export.py", tmp_path, f"train.checkpoint_dir={tmp_path / 'ck'}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "iter_0000032 is missing" in out.stderr and not (tmp_path / "models").exists()


def test_exporting_a_megatron_checkpoint_without_megatron_bridge_says_where_to_run_it(tmp_path, spm_dir):
    (tmp_path / "ck" / "lc" / "run" / "iter_0000032").mkdir(parents=True)
    (tmp_path / "ck" / "lc.json").write_text(json.dumps({"stage": "lc", "checkpoint": str(tmp_path / "ck/lc/run"),
                                                         "iteration": 32, "digest": "run", "format": "megatron"}))
    out = stage("export.py", tmp_path, f"train.checkpoint_dir={tmp_path / 'ck'}", "export.verify_tokens=0",
                f"tokenizer.dir={spm_dir}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "needs Megatron-Bridge and Transformer Engine" in out.stderr and "make export" in out.stderr
    assert list((tmp_path / "models").glob("*")) == []  # neither models/hf nor a temporary directory left


def test_training_log_row_writes_memory_only_where_measured(tmp_path):
    """Both backends log through one function: the GPU adds allocated and reserved peaks, the CPU neither."""
    from dvclive import Live

    from nano3.train.metrics import log_train_step, read_metric

    row = dict(loss=2.5, lr=1e-4, grad_norm=0.5, tokens_per_s=8000.0, world=2, flops={"true": 1e9, "bridge": 1.1e9},
               load={}, label="phase1")
    with Live(str(tmp_path / "gpu"), save_dvc_exp=False, dvcyaml=False, report=None) as live:
        log_train_step(live, 1, memory_gib=40.0, reserved_gib=47.5, **row)
    with Live(str(tmp_path / "cpu"), save_dvc_exp=False, dvcyaml=False, report=None) as live:
        log_train_step(live, 1, memory_gib=None, **row)
    assert read_metric(tmp_path / "gpu", "perf/max_memory_reserved_gib") == [(1, 47.5)]
    assert read_metric(tmp_path / "gpu", "perf/tflops_per_gpu_bridge") == [(1, pytest.approx(8000 * 1.1e9 / 2 / 1e12))]
    assert read_metric(tmp_path / "cpu", "perf/max_memory_gib") == []
    assert read_metric(tmp_path / "cpu", "perf/max_memory_reserved_gib") == []
    assert read_metric(tmp_path / "cpu", "train/loss") == [(1, 2.5)]


def test_host_memory_counts_the_rank_and_its_workers(tmp_path):
    """perf/host_rss_gib: the rank's peak plus its live data-loader workers; a worker holding 256 MiB shows."""
    import multiprocessing

    from nano3.train.metrics import host_memory_gib

    before = host_memory_gib()["perf/host_rss_gib"]
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    worker = multiprocessing.get_context("fork").Process(target=_hold_memory, args=(256, ready, done))
    worker.start()
    try:
        assert ready.wait(60)
        during = host_memory_gib()
    finally:
        done.set()
        worker.join()
    assert during["perf/host_rss_gib"] - before > 0.2
    assert during["perf/host_children_gib"] > 0.2  # the worker's own pages, apart from the rank's peak
    assert during["perf/host_rss_gib"] == pytest.approx(during["perf/host_rank_peak_gib"] + during["perf/host_children_gib"])
    assert 0 < during["perf/host_used_gib"]


def _hold_memory(mib, ready, done):
    block = bytearray(mib * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    ready.set()
    done.wait(60)


def test_lc_mix_cuts_an_even_share_of_samples_into_short_sequences():
    from nano3.data.lc_mix import is_short

    for share in (0.1, 0.25, 0.5):
        cut = [is_short(i, share) for i in range(4000)]
        assert sum(cut) == round(4000 * share)
        assert all(sum(cut[i:i + int(1 / share)]) >= 1 for i in range(0, 4000, int(1 / share)))  # spread, not bunched
    assert not any(is_short(i, 0.0) for i in range(100))


def test_a_short_sample_is_its_tokens_as_independent_sequences():
    """The pieces of a cut sample are the sample's own tokens, targets and mask (nothing dropped or truncated); its
    loss is the mean loss of each piece run alone, and a micro-batch weighs a cut sample as one sample."""
    import torch
    from transformers import AutoModelForCausalLM

    from nano3.config.sections import Mix
    from nano3.model.hf import nemotron_h_config, use_cpu_mamba_chunks
    from nano3.model.presets import PRESETS
    from nano3.train.backends.reference import batch_loss, micro_batch_groups, short_rows

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(nemotron_h_config(PRESETS["tiny"], vocab_size=512, eod_id=2,
                                                               max_positions=256)).eval()
    use_cpu_mamba_chunks(model)
    tokens = torch.randint(3, 512, (257,))
    sample = {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(256)}
    rows = short_rows(sample, 64)
    assert len(rows) == 4 and torch.equal(torch.cat([r["tokens"] for r in rows]), sample["tokens"])
    assert torch.equal(torch.cat([r["labels"] for r in rows]), sample["labels"])
    with torch.no_grad():
        alone = [batch_loss(model, [r]).item() for r in rows]
        assert batch_loss(model, rows).item() == pytest.approx(sum(alone) / 4, rel=1e-5)
        assert batch_loss(model, rows).item() != pytest.approx(batch_loss(model, [sample]).item(), rel=1e-3)
    groups = micro_batch_groups([sample, sample, sample, sample], 0, Mix(short_share=0.5, short_length=64))
    assert sorted(count for _, count in groups) == [1, 1, 2]  # two long samples together, two cut ones alone
    assert sum(len(r) for r, c in groups if c == 1) == 8
    assert micro_batch_groups([sample], 0, Mix()) == [([sample], 1)]


def test_lc_mix_on_gpus_is_refused_before_any_work_where_packed_sequences_cannot_run(tmp_path):
    """Megatron trains lc.mix as packed sequences: one sample per micro-batch, the fused Mamba path, short
    sequences that split evenly over 2 x CP. Anything else stops in one line before any work; a layout that can
    run them plans."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    def dry_run(*overrides):
        return subprocess.run([sys.executable, "stages/lc.py", "--dry-run", "train.backend=megatron",
                               "lc.mix.short_share=0.25", "lc.micro_batch_size=1", *overrides],
                              cwd=ROOT, capture_output=True, text=True)

    for overrides, says in ((["lc.micro_batch_size=2"], "set lc.micro_batch_size=1"),
                            (["train.kernels.fused_mamba=false"], "set train.kernels.fused_mamba=true"),
                            (["lc.parallel.cp=4", "lc.gpus_per_node=4", "lc.mix.short_length=4"], "a multiple of 8")):
        out = dry_run(*overrides)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
        assert "lc.mix.short_share=0.25" in lines[0] and says in lines[0]
    assert dry_run().returncode == 0
