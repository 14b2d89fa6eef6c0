"""What DVC costs on prepared data, before and after issue 31's storage design, on >= 10 GB of real shards.

    python bench/data_storage.py [--gb 10] [--corpus-mb 200] [--work /tmp/data-storage]

Real text, prepared for real: this environment's site-packages `.py` files as one JSONL corpus (bench/prep_throughput.py
builds it), tokenized by `stages/prep.py` with the embedded tokenizer, as N datasets until the shards reach `--gb`.
Each copy is cut into units of another size (`prep.unit_mb` 8 + i/8 MB per dataset), so its train shards start and
end at other documents and no two are the same bytes (DVC's cache would store identical files once). All of it runs in a temporary git + DVC repository whose `prep`
stage is the project's (foreach dataset: `stages/prep.py <name>`, the source as its dependency).

- after (this design): the stage's output is `prep.out_dir/<name>` (the manifest alone); the shards are in
  `prep.shards_dir`. Timed: `dvc repro` of every dataset (tokenizing included), then `dvc commit -f` and `dvc status`.
- before: the same shards as cached DVC outputs, as the old layout's `data/prepared/<name>` directory was (a stage
  per dataset whose output is its shard directory, committed with `dvc commit -f`: what `dvc repro` did after
  tokenizing, and what a `dvc commit` of a cluster job's outputs does). Timed: `dvc commit -f`, `dvc status`.
- Extra disk: `.dvc/cache`'s growth. Also timed: `python -m nano3.data.shards` (sizes) and `--sha256` (every byte).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from prep_throughput import jsonl_corpus  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    start = time.time()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.time() - start


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def dvc_yaml(names: list[str], before: bool) -> dict:
    copies = [{"name": n, "unit_mb": 8 + i / 8} for i, n in enumerate(names)]
    stages = {"prep": {"foreach": copies, "do": {
        "cmd": f"{sys.executable} {ROOT / 'stages' / 'prep.py'} ${{item.name}} prep.unit_mb=${{item.unit_mb}}",
        "deps": ["corpus.jsonl", "tokenizer"], "params": ["datasets.${item.name}"],
        "outs": ["${prep.out_dir}/${item.name}"]}}}
    if before:  # the old layout's output: the dataset's shards, cached
        stages["shards"] = {"foreach": names, "do": {"cmd": "true", "outs": ["data/shards/${item}"]}}
    return {"stages": stages}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=10.0, help="prepared shards to reach (GB of .bin/.idx)")
    parser.add_argument("--corpus-mb", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/data-storage"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    corpus = jsonl_corpus(args.corpus_mb)
    repo = args.work / "repo"
    shutil.rmtree(args.work, ignore_errors=True)
    repo.mkdir(parents=True)
    os.link(corpus, repo / "corpus.jsonl") if corpus.stat().st_dev == repo.stat().st_dev else \
        shutil.copy2(corpus, repo / "corpus.jsonl")
    shutil.copytree(ROOT / "data" / "tokenizer", repo / "tokenizer")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenizer"]["dir"] = "tokenizer"
    params["prep"]["workers"] = 0

    def write(names: list[str], before: bool = False) -> None:
        params["datasets"] = {n: {"source": "corpus.jsonl", "watch": "corpus.jsonl"} for n in names}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(names, before), sort_keys=False))

    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        timed(cmd, repo)
    # One dataset first, to size the rest.
    write(["copy-000"])
    first = timed(["dvc", "repro"], repo)
    per_copy = tree_bytes(repo / "data" / "shards")
    copies = max(1, -(-int(args.gb * 1e9) // per_copy))
    names = [f"copy-{i:03d}" for i in range(copies)]
    write(names)
    print(f"{args.corpus_mb} MB corpus -> {per_copy / 1e9:.3f} GB of shards per copy ({first:.0f} s); "
          f"{copies} copies for {args.gb} GB", flush=True)
    result = {"corpus_mb": args.corpus_mb, "copies": copies, "shard_bytes_per_copy": per_copy,
              "cores": os.cpu_count()}
    cache = repo / ".dvc" / "cache"
    cache_before = tree_bytes(cache)
    result["after"] = {"repro_s": first + timed(["dvc", "repro"], repo)}
    result["shard_bytes"] = tree_bytes(repo / "data" / "shards")
    result["after"]["commit_s"] = timed(["dvc", "commit", "-f"], repo)
    result["after"]["status_s"] = timed(["dvc", "status"], repo)
    result["after"]["cache_bytes"] = tree_bytes(cache) - cache_before
    result["verify_sizes_s"] = timed([sys.executable, "-m", "nano3.data.shards"], repo)
    result["verify_sha256_s"] = timed([sys.executable, "-m", "nano3.data.shards", "--sha256"], repo)
    print(f"after: dvc repro {result['after']['repro_s']:.0f} s, commit {result['after']['commit_s']:.1f} s, "
          f"status {result['after']['status_s']:.1f} s, cache +{result['after']['cache_bytes'] / 1e6:.2f} MB; "
          f"verify-data {result['verify_sizes_s']:.1f} s, with sha256 {result['verify_sha256_s']:.0f} s", flush=True)

    write(names, before=True)
    cache_before = tree_bytes(cache)
    result["before"] = {"commit_s": timed(["dvc", "commit", "-f"], repo)}
    result["before"]["status_s"] = timed(["dvc", "status"], repo)
    result["before"]["cache_bytes"] = tree_bytes(cache) - cache_before
    print(f"before: dvc commit {result['before']['commit_s']:.0f} s, status {result['before']['status_s']:.1f} s, "
          f"cache +{result['before']['cache_bytes'] / 1e9:.2f} GB, for {result['shard_bytes'] / 1e9:.2f} GB of "
          f"shards; commit x{result['before']['commit_s'] / result['after']['commit_s']:.0f} slower", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not os.environ.get("KEEP"):
        shutil.rmtree(args.work)
    return result


if __name__ == "__main__":
    main()
