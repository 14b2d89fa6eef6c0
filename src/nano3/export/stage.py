"""Stage `export`: the final checkpoint of `export.source` (lc or pretrain) as a Hugging Face model directory.

The directory (config.json, safetensors, tokenizer files, nano3_export.json with the lineage) loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. Megatron checkpoints go
through Megatron-Bridge on a GPU, which also checks the written model's logits against Megatron's;
the CPU reference backend's checkpoints are already in HF format and are copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from nano3.data.tokenizer import read_info
from nano3.errors import UserError
from nano3.eval.data import blend_datasets, split_stream, windows
from nano3.export.hf import nemotron_h_config, save_hf_tokenizer
from nano3.files import atomic_dir, atomic_write_json, read_json
from nano3.train.presets import model_preset
from nano3.train.run import checkpoint_dir, manifest_path

HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def verify_windows(params) -> np.ndarray | None:
    """Held-out tokens of the first blend dataset, as windows of the pretraining sequence length."""
    tokens = params.get_key("export.verify_tokens", 0, kind=int)
    if tokens <= 0:
        return None
    seq = min(params.get_key("train.seq_length", kind=int), tokens)
    return windows(split_stream(params, blend_datasets(params)[0], "test", tokens + 1), seq)


def source_checkpoint(params) -> tuple[dict, Path, Path]:
    source = params.get_key("export.source", kind=str)
    if source not in ("pretrain", "lc"):
        raise UserError(f"{params.source}: export.source={source!r}; use 'lc' or 'pretrain'")
    manifest_file = manifest_path(params, source)
    manifest = read_json(manifest_file, f"{source} manifest (run make {source})")
    ckpt = checkpoint_dir(manifest["checkpoint"], manifest["iteration"])
    if not ckpt.is_dir():
        raise UserError(f"{manifest_file}: its checkpoint {ckpt} is missing; rerun the {source} stage "
                        f"(dvc repro -f {source}) or restore the checkpoint directory")
    return manifest, manifest_file, ckpt


def export_stage(params) -> dict:
    manifest, manifest_file, ckpt = source_checkpoint(params)
    out_dir = Path(params.get_key("export.out_dir", kind=str))
    tokenizer_dir = params.get_key("tokenizer.dir", kind=str)
    info = read_info(tokenizer_dir)
    fmt = manifest.get("format", "megatron")
    with atomic_dir(out_dir) as tmp:
        if fmt == "megatron":
            from nano3.export.megatron import export_megatron

            preset = model_preset(params)
            positions = max(params.get_key("train.seq_length", kind=int), params.get_key("lc.seq_length", kind=int))
            check = export_megatron(ckpt, lambda vocab: nemotron_h_config(preset, vocab, info.eod_id, positions),
                                    tmp, verify_windows(params))
        elif fmt == "hf":
            copied = [shutil.copy2(ckpt / name, tmp / name) for name in HF_MODEL_FILES if (ckpt / name).exists()]
            if not copied or not (tmp / "config.json").exists():
                raise UserError(f"{ckpt}: no config.json/model.safetensors; the checkpoint is incomplete, rerun "
                                f"the {manifest['stage']} stage")
            check = {}
        else:
            raise UserError(f"{manifest_file}: unknown checkpoint format {fmt!r}")
        save_hf_tokenizer(tokenizer_dir, tmp)
        record = {"source": manifest["stage"], "checkpoint": str(ckpt), "iteration": manifest["iteration"],
                  "run_digest": manifest["digest"], "format": fmt, "logits_check": check}
        atomic_write_json(tmp / "nano3_export.json", record)
    limit = params.get_key("export.max_rel_l2", 0.02, kind=float)
    if check and not check["rel_l2"] <= limit:
        raise UserError(f"{out_dir}: transformers' logits differ from Megatron's by {check['rel_l2']:.4f} (relative L2) "
                        f"> export.max_rel_l2={limit}; the HF config does not match the trained model")
    atomic_write_json(Path(params.get_key("export.report", kind=str)), record)
    return record
