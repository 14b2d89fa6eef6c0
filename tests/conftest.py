"""Shared fixtures: the real sample corpus and a trained tokenizer, built once per test session."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import nano3  # noqa: F401  (quiets megatron-core's import warnings)
from nano3.config import Params

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    has_gpu_stack = False
    try:
        import torch

        if torch.cuda.is_available():
            import megatron.bridge  # noqa: F401
            import transformer_engine  # noqa: F401

            has_gpu_stack = True
    except Exception:
        pass
    if not has_gpu_stack:
        skip = pytest.mark.skip(reason="needs a CUDA GPU with Megatron-Bridge and Transformer Engine (run on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from nano3.data.sample import build_sample_corpus

    out = tmp_path_factory.mktemp("sample") / "sample"
    build_sample_corpus(out, code_shards=4, docs_shards=2, exclude_dirs=["site-packages"])
    return out


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory, sample_dir) -> Path:
    """A SentencePiece tokenizer trained on the sample corpus (smaller than the default, for speed)."""
    from nano3.data.sources import DatasetSpec, Source, iter_texts
    from nano3.data.tokenizers import train_sentencepiece

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    texts = (t for name in ("stdlib-code", "stdlib-docs")
             for t in iter_texts(Source(DatasetSpec(name=name, source=str(sample_dir / name)))))
    train_sentencepiece(texts, out, vocab_size=4096, max_sentences=100_000, seed=7)
    return out


def make_params(tmp: Path, tokenizer_dir: Path, datasets: dict, **sections) -> Params:
    """A params tree like params.yaml, pointed at temporary directories."""
    tree = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    tree["tokenizer"]["dir"] = str(tokenizer_dir)
    tree["prep"].update(out_dir=str(tmp / "prepared"), shards_dir=str(tmp / "shards"), work_dir=str(tmp / "work"),
                        workers=1)
    tree["blend"].update(out_dir=str(tmp / "blend"), cache_dir=str(tmp / "blend-cache"), report_dir=str(tmp / "reports"))
    tree["datasets"] = {name: {"watch": spec["source"], **spec} for name, spec in datasets.items()}  # watch: required
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    params = Params(tree)
    params.source = "params.yaml"
    return params


@pytest.fixture
def params_factory(tmp_path, spm_dir):
    def factory(datasets: dict, **sections) -> Params:
        return make_params(tmp_path, spm_dir, datasets, **sections)

    return factory


def write_hub_repo(repo: Path, configs: dict[str, tuple[str, list[dict]]]) -> Path:
    """A dataset repo laid out as on the Hub, as `prep.hf_mirror` reads it: per config, a folder of Parquet files
    (one per table of columns) and its entry in the README card's `configs`; a config named `default` with the
    folder `data` is the card-less default layout (data/*.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = []
    for name, (folder, tables) in configs.items():
        (repo / folder).mkdir(parents=True)
        for i, columns in enumerate(tables):
            pq.write_table(pa.table(columns), repo / folder / f"part_{i}.parquet")
        if (name, folder) != ("default", "data"):
            card.append({"config_name": name, "data_files": [{"split": "train", "path": f"{folder}/*.parquet"}]})
    (repo / "README.md").write_text(f"---\n{yaml.safe_dump({'configs': card}) if card else 'license: other\n'}---\n")
    return repo


SKIP_WHEN_NOT_GIT = {".git", ".venv", "data", "checkpoints", "dvclive", "reports", "logs", "__pycache__",
                     ".pytest_cache", ".ruff_cache"}


def source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (or, in a copy without .git, all but outputs)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.split("\n")
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not ({*p.relative_to(ROOT).parts} & SKIP_WHEN_NOT_GIT)
            and not p.relative_to(ROOT).parts[0].startswith((".dev", ".whl"))]


def copy_repo(dest: Path) -> Path:
    """This checkout's source (not its outputs), as a fresh git repository."""
    files = source_files()
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest
