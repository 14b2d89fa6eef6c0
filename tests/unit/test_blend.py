"""Blends: Bridge's per-split format, weights as token shares, megatron-core's builder, the report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.utils import get_blend_from_list

from nano3.blend.blend import build_blends
from nano3.data.prep import prepare_dataset
from nano3.errors import UserError
from tests.conftest import make_params

WEIGHTS = {"phase1": {"code": 0.7, "docs": 0.3}, "phase2": {"code": 0.2, "docs": 0.8}, "lc": {"code": 0.5, "docs": 0.5}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_dir, spm_dir):
    tmp = tmp_path_factory.mktemp("blend")
    datasets = {"code": {"source": str(sample_dir / "stdlib-code"), "valid_fraction": 0.05, "test_fraction": 0.05},
                "docs": {"source": str(sample_dir / "stdlib-docs"), "valid_fraction": 0.05, "test_fraction": 0.05}}
    params = make_params(tmp, spm_dir, datasets, blend={"phases": WEIGHTS}, prep={"unit_mb": 1})
    prepare_dataset(params, "code", sample_rows=400, show_progress=False)
    prepare_dataset(params, "docs", show_progress=False)
    return tmp, params


def blend_params(prepared, **blend):
    tmp, params = prepared
    return make_params(tmp, params["tokenizer"]["dir"], params["datasets"], blend={"phases": WEIGHTS, **blend},
                       prep={"unit_mb": 1})


def test_blend_files_follow_bridge_per_split_format_with_token_share_weights(prepared):
    tmp, _ = prepared
    build_blends(blend_params(prepared, validate=False, prebuild_cache=False), log=lambda *_: None)
    for phase, weights in WEIGHTS.items():
        doc = json.loads((tmp / "blend" / f"{phase}.json").read_text())
        assert set(doc) == {"train", "valid", "test"}
        for split in ("train", "valid", "test"):
            prefixes, shard_weights = get_blend_from_list(doc[split])  # what Bridge's loader calls
            assert all(p.startswith(str(tmp / "shards")) for p in prefixes)  # prep.shards_dir/<dataset>/<version>
            per_dataset = Counter()
            for prefix, w in zip(prefixes, shard_weights):
                per_dataset[prefix.split("/shards/")[1].split("/")[0]] += w
            assert per_dataset == pytest.approx(weights)
        manifest = json.loads((tmp / "prepared" / "code" / "manifest.json").read_text())
        shards = manifest["splits"]["train"]["shards"]
        prefixes, shard_weights = get_blend_from_list(doc["train"])
        code_w = {p: w for p, w in zip(prefixes, shard_weights) if "/code/" in p}
        for shard in shards:  # within a dataset, shards are weighted by their tokens
            expected = weights["code"] * shard["tokens"] / manifest["splits"]["train"]["tokens"]
            assert code_w[str(Path(manifest["shards_dir"]) / shard["prefix"])] == pytest.approx(expected)


def test_megatron_builder_draws_samples_in_the_blend_proportions(prepared):
    tmp, _ = prepared
    summary = build_blends(blend_params(prepared, validate=True, prebuild_cache=True), log=lambda *_: None)
    assert summary["phases"]["phase1"]["samples"]["train"] > 0
    assert list((tmp / "blend-cache").rglob("*.npy"))  # the index cache a GPU job will reuse (blend.cache_dir)
    # Rebuild phase 1's train split from the cache and count which dataset each sample came from.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from nano3.data.megatron import megatron_tokenizer
    from nano3.data.tokenizers import read_info

    tok_dir = blend_params(prepared)["tokenizer"]["dir"]
    doc = json.loads((tmp / "blend" / "phase1.json").read_text())
    config = GPTDatasetConfig(random_seed=1234, sequence_length=256, blend_per_split=[get_blend_from_list(doc["train"]), None, None],
                              tokenizer=megatron_tokenizer(tok_dir, read_info(tok_dir)), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    train = BlendedMegatronDatasetBuilder(GPTDataset, [20000, 0, 0], lambda: True, config).build()[0]
    source = np.array(["/code/" in train.datasets[i].dataset_path for i in train.dataset_index])
    assert source.mean() == pytest.approx(0.7, abs=0.01)  # 70% of sequences, hence of tokens, are code


def test_report_warns_about_over_repeated_datasets_and_plots(prepared):
    tmp, _ = prepared
    params = blend_params(prepared, validate=False, max_epochs=0.5)
    params["train"]["tokens"] = 4_000_000
    logged = []
    build_blends(params, log=logged.append)
    warnings = [line for line in logged if line.startswith("warning:")]
    assert any("phase1: docs would be read" in w and "blend.max_epochs=0.5" in w for w in warnings)
    report = (tmp / "reports" / "report.md").read_text()
    assert "| phase1 | docs | 30.0% |" in report and "## Warnings" in report
    png = (tmp / "reports" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    docs_tokens = json.loads((tmp / "prepared" / "docs" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    row = next(r for r in (tmp / "reports" / "shares.csv").read_text().splitlines() if r.startswith("phase1/docs"))
    phase1_tokens = round(4_000_000 * 0.94 / (16 * 1024)) * 16 * 1024
    assert float(row.split(",")[4]) == pytest.approx(0.3 * phase1_tokens / docs_tokens, rel=1e-4)
    params["blend"]["strict_epochs"] = True  # the same blend is refused, the report still written for reading
    (tmp / "reports" / "report.md").unlink()
    with pytest.raises(UserError, match=r"blend.strict_epochs: \d+ dataset\(s\) above blend.max_epochs=0.5, e.g. "
                                        r"phase1: \w+ read [\d.]+ times"):
        build_blends(params, log=lambda *_: None)
    assert (tmp / "reports" / "report.md").exists()


@pytest.mark.parametrize("phases,message", [
    ({"phase1": {"code": "lots"}}, "'blend.phases.phase1.code' must be a number, got 'lots'"),
    ({"phase1": {"code": -1}}, "'blend.phases.phase1.code' = -1 must be a finite weight >= 0"),
    ({"phase1": {"code": 0, "docs": 0}}, "'blend.phases.phase1' has no positive weight"),
    ({"phase1": {"web": 1.0}}, "the blend names 'web', which is not in `datasets`"),
])
def test_bad_weights_are_one_line_errors(prepared, phases, message):
    with pytest.raises(UserError) as err:
        build_blends(blend_params(prepared, phases={**WEIGHTS, **phases}), log=lambda *_: None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_blend_naming_an_unprepared_dataset(prepared, sample_dir):
    params = blend_params(prepared, phases={**WEIGHTS, "lc": {"code": 1, "fresh": 1}})
    docs = str(sample_dir / "stdlib-docs")
    params["datasets"]["fresh"] = {"source": docs, "watch": docs}
    with pytest.raises(UserError, match=r"prepared/fresh/manifest.json: dataset 'fresh' is not prepared; run `make prep`"):
        build_blends(params, log=lambda *_: None)


def test_a_dataset_left_without_validation_documents_is_reported(tmp_path, sample_dir, spm_dir):
    """At a small valid_fraction the hash split can leave a dataset no validation document; it then drops out
    of the validation blend: the log and report.md say so instead of leaving it silent."""
    datasets = {"docs": {"source": str(sample_dir / "stdlib-docs"), "valid_fraction": 0.0001, "test_fraction": 0.05}}
    only_docs = {phase: {"docs": 1.0} for phase in WEIGHTS}
    params = make_params(tmp_path, spm_dir, datasets, blend={"phases": only_docs, "validate": False},
                         prep={"unit_mb": 1})
    manifest = prepare_dataset(params, "docs", show_progress=False)
    assert manifest["splits"]["valid"]["documents"] == 0
    logged = []
    build_blends(params, log=logged.append)
    total = sum(manifest["splits"][s]["documents"] for s in ("train", "valid", "test"))
    gap = f"phase1: docs has no valid documents (its hash split left 0 of {total:,}), so valid loss leaves it out; " \
          "raise datasets.docs.valid_fraction"
    assert f"warning: {gap}" in logged
    assert f"- {gap}" in (tmp_path / "reports" / "report.md").read_text()


def test_long_samples_come_without_a_quadratic_attention_mask(prepared):
    """At 64k tokens megatron-core's default mask is a 16 GiB float32 tensor per sample, built in every data-loader
    worker; it killed issue 13's ranks. Our datasets (and training's, mapping.py) leave it out; the GPU makes its own."""
    from nano3.data.megatron import build_phase_datasets, megatron_tokenizer
    from nano3.data.tokenizers import read_info

    tmp, params = prepared
    build_blends(blend_params(prepared, validate=False, prebuild_cache=False), log=lambda *_: None)
    tok_dir = params["tokenizer"]["dir"]
    train, _, _ = build_phase_datasets(tmp / "blend" / "lc.json", seq_length=8192, seed=1, sizes=[2, 0, 0],
                                       tokenizer=megatron_tokenizer(tok_dir, read_info(tok_dir)), cache_dir=None)
    sample = train[0]
    assert "attention_mask" not in sample
    assert sample["tokens"].shape == (8192,)  # (short enough that a regression fails here instead of exhausting memory)
    assert sum(t.numel() * t.element_size() for t in sample.values() if hasattr(t, "numel")) == 8192 * 28

    from torch.utils.data import default_collate

    from nano3.data.lc_mix import ShortSequenceMix

    packed = default_collate([ShortSequenceMix(train, share=1.0, short_length=1024)[0]])  # lc.mix's batch of one
    assert packed["cu_seqlens_q"].tolist() == [list(range(0, 8193, 1024))] and packed["max_seqlen_q"].tolist() == [1024]
    assert packed["tokens"].equal(sample["tokens"].unsqueeze(0))  # the same tokens, nothing cut off
