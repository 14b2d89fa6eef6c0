"""A training run's identity: the digest of what it learns from, which names its directory.

`checkpoints/<stage>/<run digest>/`: a killed or preempted run restarts in the same directory and resumes from
its latest checkpoint, while a changed hyperparameter (`dvc exp run -S train.lr=...`) gets a fresh one, and going
back to a value trained before finds that run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nano3.config import section_name
from nano3.errors import UserError
from nano3.files import read_json
from nano3.train.rundir import manifest_path

# train.* keys that do not change what is learned: a changed value resumes the same run.
OPERATIONAL_KEYS = {"keep_checkpoints", "nodes", "gpus_per_node", "parallel", "micro_batch_size", "log_interval", "save_interval", "save_minutes", "live_dir",
                    "eval_interval", "eval_iters", "measured_tflops_per_gpu", "kernels", "recompute_modules",
                    "precision", "fp8_edge_layers_bf16", "bridge_overrides", "backend", "num_workers", "env"}


def run_digest(params, stage: str, upstream: dict[str, str]) -> str:
    """Identity of a training run: what it learns from. Checkpoints live under it, so a kill resumes
    the same run while `dvc exp run -S train.lr=...` starts a new one."""
    section = section_name(stage)
    learned = {k: v for k, v in params[section].items() if k not in OPERATIONAL_KEYS}  # the tree as written
    doc = {"stage": stage, "model": params["model"], section: learned, "upstream": upstream}
    if stage == "lc":
        doc["train_seed"] = params.settings.train.seed
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing; run the stage that writes it (make blend / make pretrain)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def upstream_digests(params, stage: str) -> dict[str, str]:
    blend_dir = Path(params.settings.blend.out_dir)
    tok = Path(params.settings.tokenizer.dir) / "info.json"
    if stage == "pretrain":
        return {"phase1": file_digest(blend_dir / "phase1.json"), "phase2": file_digest(blend_dir / "phase2.json"),
                "tokenizer": file_digest(tok)}
    return {"lc": file_digest(blend_dir / "lc.json"), "tokenizer": file_digest(tok),
            "pretrain": pretrained_identity(manifest_path(params.settings.train, "pretrain"))}


def pretrained_identity(manifest: Path) -> str:
    """The checkpoint lc starts from: pretrain's run, iteration and backend. Not the manifest file's bytes, which
    carry wall-clock throughput: a pretrain rerun to the same weights must not start a new lc run."""
    pre = read_json(manifest, "pretrain manifest (run make pretrain)")
    doc = {k: pre.get(k) for k in ("digest", "iteration", "backend")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
