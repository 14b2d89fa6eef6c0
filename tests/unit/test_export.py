"""The Hugging Face side of export and the CPU reference backend: config from a preset, tokenizer files."""

from __future__ import annotations

import os

import pytest

from nano3.data.tokenizers import Encoder, read_info
from nano3.export.hf import save_hf_tokenizer
from nano3.model.flops import param_counts
from nano3.model.hf import nemotron_h_config
from nano3.model.presets import PRESETS
from tests.unit.test_tokenizer import docs_from, hf_tokenizer_dir


def counted(model) -> int:
    """Weights plus the routers' expert-bias buffers (which the plan counts with the router)."""
    bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + bias


def test_hf_config_of_the_tiny_preset_has_exactly_the_planned_parameters():
    import torch
    from transformers import AutoModelForCausalLM

    preset = PRESETS["tiny"]
    config = nemotron_h_config(preset, vocab_size=8192, eod_id=2, max_positions=4096)
    assert config.hybrid_override_pattern == preset.hybrid_layer_pattern
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert counted(model) == param_counts(preset, 8192).total
    kinds = {type(layer.mixer).__name__ for layer in model.model.layers}
    assert kinds == {"NemotronHMamba2Mixer", "NemotronHMoE", "NemotronHAttention"}


@pytest.mark.parametrize("preset", ["nano3"])
def test_hf_config_of_the_full_model_matches_the_published_size(preset):
    import torch
    from transformers import AutoModelForCausalLM

    config = nemotron_h_config(PRESETS[preset], vocab_size=131072, eod_id=11, max_positions=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = counted(model)
    assert total == param_counts(PRESETS[preset], 131072).total
    assert 31.5e9 < total < 31.7e9  # the tech report's 31.6B


def test_exported_sentencepiece_tokenizer_encodes_exactly_as_training(tmp_path, sample_dir, spm_dir):
    from transformers import AutoTokenizer

    save_hf_tokenizer(spm_dir, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    docs = docs_from(sample_dir, "stdlib-docs", 300) + docs_from(sample_dir, "stdlib-code", 300)
    docs += ["\nleading newline", "\tleading tab", "  two spaces", "ends with spaces  ", "", "x = '</s>' <s> <unk>",
             "emoji \U0001f642 and \u00e9", "\r\nwindows"]
    ours = Encoder(spm_dir).encode_batch(docs)
    theirs = [tok.encode(d, add_special_tokens=False) for d in docs]
    assert [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if list(a) != b] == []
    assert tok.eos_token_id == read_info(spm_dir).eod_id
    assert tok.decode(ours[0]) == docs[0]


def test_exported_huggingface_tokenizer_is_the_pinned_one(tmp_path, sample_dir):
    from transformers import AutoTokenizer

    from nano3.data.tokenizers import save_huggingface

    docs = docs_from(sample_dir, "stdlib-docs", 100)
    save_huggingface(str(hf_tokenizer_dir(tmp_path / "src", docs)), tmp_path / "pinned")
    save_hf_tokenizer(tmp_path / "pinned", tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [tok.encode(d, add_special_tokens=False) for d in docs[:20]] == Encoder(tmp_path / "pinned").encode_batch(docs[:20])


def test_the_exported_tokenizer_files_do_not_depend_on_the_machines_hub_settings(spm_dir, tmp_path):
    """Found on the recipe-image stand-in: under HF_HUB_OFFLINE=1 (a cluster job) transformers wrote
    `local_files_only: true` into tokenizer_config.json, so the same tokenizer exported to different bytes."""
    import subprocess
    import sys

    code = "import sys; from nano3.export.hf import save_hf_tokenizer; save_hf_tokenizer(sys.argv[1], sys.argv[2])"
    for offline in ("0", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        subprocess.run([sys.executable, "-c", code, str(spm_dir), str(tmp_path / offline)], env=env, check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes(), name
