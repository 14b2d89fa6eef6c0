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

from nano3.config.clusters import local_gpu_memory
from nano3.data.splits import blend_datasets, split_stream, windows
from nano3.data.tokenizers import read_info
from nano3.errors import UserError
from nano3.export.footprint import check_stage
from nano3.export.hf import save_hf_tokenizer
from nano3.extras import ensure_nemotron_h
from nano3.files import atomic_dir, atomic_write_json, link_or_copy, read_json
from nano3.model.hf import nemotron_h_config, steady_gpu_allocator
from nano3.model.presets import model_preset
from nano3.train.rundir import iteration_dir, manifest_path

HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def verify_windows(params) -> np.ndarray | None:
    """Held-out tokens of the first blend dataset, as windows of the pretraining sequence length."""
    tokens = params.settings.export.verify_tokens
    if tokens <= 0:
        return None
    seq = min(params.settings.train.seq_length, tokens)
    return windows(split_stream(params, blend_datasets(params)[0], "test", tokens + 1), seq)


def source_checkpoint(params, source: str) -> tuple[dict, Path, Path]:
    if source not in ("pretrain", "lc"):
        raise UserError(f"{params.source}: export.source={source!r}; use 'lc' or 'pretrain'")
    manifest_file = manifest_path(params.settings.train, source)
    manifest = read_json(manifest_file, f"{source} manifest (run make {source})")
    ckpt = iteration_dir(manifest["checkpoint"], manifest["iteration"])
    if not ckpt.is_dir():
        raise UserError(f"{manifest_file}: its checkpoint {ckpt} is missing; rerun the {source} stage "
                        f"(dvc repro -f {source}) or restore the checkpoint directory")
    return manifest, manifest_file, ckpt


def export_checkpoint(params, source: str, out_dir: Path) -> dict:
    """The final checkpoint of `source` (pretrain or lc) as a Hugging Face directory; returns its record."""
    manifest, manifest_file, ckpt = source_checkpoint(params, source)
    tokenizer_dir = params.settings.tokenizer.dir
    info = read_info(tokenizer_dir)
    fmt = manifest.get("format", "megatron")
    with atomic_dir(out_dir) as tmp:
        if fmt == "megatron":
            from nano3.export.megatron import export_megatron

            preset = model_preset(params.settings.model)
            positions = max(params.settings.train.seq_length, params.settings.lc.seq_length)
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
                  "run_digest": manifest["digest"], "training_code": manifest.get("code"), "format": fmt,
                  "logits_check": check}
        limit = params.settings.export.max_rel_l2
        if check and not check["rel_l2"] <= limit:  # refused before the directory replaces the last good one
            raise UserError(f"{out_dir}: transformers' logits differ from Megatron's by {check['rel_l2']:.4f} "
                            f"(relative L2) > export.max_rel_l2={limit}; the HF config does not match the trained model")
        atomic_write_json(tmp / "nano3_export.json", record)
    return record


def export_stage(params) -> dict:
    """export.source's checkpoint to export.out_dir, and pretrain's to export.pretrain_dir (eval's "before lc")."""
    cfg = params.settings.export
    steady_gpu_allocator()
    check_stage(params, "export", local_gpu_memory(), log=print)
    record = export_checkpoint(params, cfg.source, Path(cfg.out_dir))
    if cfg.source == "lc":
        record["pretrain_logits_check"] = export_checkpoint(params, "pretrain", Path(cfg.pretrain_dir))["logits_check"]
    else:  # the same checkpoint: linked, not copied (63 GB at the real size)
        with atomic_dir(cfg.pretrain_dir) as tmp:
            shutil.copytree(cfg.out_dir, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
    atomic_write_json(Path(cfg.report), record)
    return record


def run(params, args) -> dict:
    """Stage `export`."""
    ensure_nemotron_h()  # on an image without transformers' NemotronH: its side folder, or one line before any work
    record = export_stage(params)
    check = record["logits_check"]
    print(f"export: {record['source']} iteration {record['iteration']} -> {params.settings.export.out_dir}"
          + (f" (logits vs Megatron: relative L2 {check['rel_l2']:.2e}, max |diff| {check['max_abs_diff']:.3f}, "
             f"argmax agrees {check['top1_agreement']:.2%} of {check['tokens']} tokens)" if check else ""))
    return record
