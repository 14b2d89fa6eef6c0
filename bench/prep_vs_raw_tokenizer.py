"""Data-preparation throughput and memory against the raw tokenizer, measured in the same run.

    python bench/prep_vs_raw_tokenizer.py [--large-mb 200] [--workers 1,2]

Corpora (real text, local): the sample corpus's `stdlib-code` (Parquet), and a larger one made of
every `.py` file of this environment's site-packages (JSONL shards), cut to `--large-mb`.
For each: the raw tokenizer alone (batched encode of documents already in memory, one thread, no
I/O) gives the baseline docs/s and tokens/s; then the prep stage's own code (read, hash, split,
tokenize, write bin/idx, checksums) with 1 and N worker processes. Printed: per-worker throughput
as a ratio of the raw tokenizer's, the N-worker speed-up, and peak RSS per process for the corpus
at 1/4 and full size (memory should not grow with the dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_large_corpus(dest: Path, limit_mb: int, shard_mb: int = 32) -> Path:
    """site-packages source files as JSONL shards of about shard_mb each (deterministic order)."""
    if (dest / "done").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    site = Path(sysconfig.get_paths()["purelib"])
    budget, shard, size, f = limit_mb << 20, 0, 0, None
    for path in sorted(site.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if f is None or size >= shard_mb << 20:
            if f:
                f.close()
            f = open(dest / f"part-{shard:05d}.jsonl", "w")
            shard, size = shard + 1, 0
        line = json.dumps({"text": text, "path": str(path.relative_to(site))}) + "\n"
        f.write(line)
        size += len(line)
        budget -= len(line)
        if budget <= 0:
            break
    f.close()
    (dest / "done").write_text("")
    return dest


def child_raw(source: str, tokenizer_dir: str) -> dict:
    from nano3.data.sources import DatasetSpec, Source, iter_texts
    from nano3.data.tokenizers import Encoder

    texts = list(iter_texts(Source(DatasetSpec(name="b", source=source))))
    enc = Encoder(tokenizer_dir)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(ids) for ids in enc.encode_batch(texts[i:i + 1000]))
    dt = time.perf_counter() - t0
    return {"docs_per_s": len(texts) / dt, "tokens_per_s": tokens / dt, "docs": len(texts), "tokens": tokens}


def child_prep(source: str, tokenizer_dir: str, workers: int, rows: int | None) -> dict:
    from nano3.config import Params
    from nano3.data.prep import prepare_dataset

    tmp = tempfile.mkdtemp(prefix="prepbench.")
    params = Params({
        "tokenizer": {"dir": tokenizer_dir},
        "prep": {"out_dir": f"{tmp}/out", "work_dir": f"{tmp}/work", "workers": workers, "batch_size": 1000,
                 "unit_mb": 8, "batch_mb": 8, "valid_fraction": 0.001, "test_fraction": 0.001},
        "datasets": {"b": {"source": source}},
    })
    t0 = time.perf_counter()
    m = prepare_dataset(params, "b", workers=workers, sample_rows=rows, show_progress=False)
    dt = time.perf_counter() - t0
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    subprocess.run(["rm", "-rf", tmp])
    return {"docs_per_s": m["documents"] / dt, "tokens_per_s": m["tokens"] / dt, "docs": m["documents"],
            "tokens": m["tokens"], "seconds": dt, "peak_rss_mb_main": self_rss,
            "peak_rss_mb_worker": child_rss if workers > 1 else self_rss}


def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    ap.add_argument("--large-mb", type=int, default=200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        kind, source = args.child[0], args.child[1]
        if kind == "raw":
            result = child_raw(source, args.tokenizer)
        else:
            rows = int(args.child[3]) if len(args.child) > 3 else None
            result = child_prep(source, args.tokenizer, int(args.child[2]), rows)
        print(json.dumps(result))
        return

    if not (Path(args.tokenizer) / "info.json").exists():
        sys.exit(f"error: {args.tokenizer}/info.json missing; run `make tokenizer` first (the bench uses its tokenizer)")
    corpora = {"sample stdlib-code (Parquet)": str(ROOT / "data" / "sample" / "stdlib-code"),
               f"site-packages {args.large_mb} MB (JSONL)": str(build_large_corpus(
                   ROOT / "bench" / "results" / f"site-packages-{args.large_mb}mb", args.large_mb))}
    workers = [int(w) for w in args.workers.split(",")]
    report = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0], "corpora": {}}
    for name, source in corpora.items():
        raw = measure("raw", source)
        runs = {w: measure("prep", source, str(w)) for w in workers}
        quarter = measure("prep", source, str(workers[-1]), str(max(1, raw["docs"] // 4)))
        report["corpora"][name] = {"raw": raw, "prep": runs, "quarter": quarter}
        print(f"\n{name}: {raw['docs']:,} documents, {raw['tokens']:,} tokens")
        print(f"  raw tokenizer (1 thread, in memory): {raw['docs_per_s']:8.0f} docs/s {raw['tokens_per_s']:11.0f} tokens/s")
        for w, r in runs.items():
            per_worker = r["tokens_per_s"] / w
            print(f"  prep, {w} worker(s): {r['docs_per_s']:8.0f} docs/s {r['tokens_per_s']:11.0f} tokens/s = "
                  f"{per_worker / raw['tokens_per_s']:.0%} of raw per worker; peak RSS main {r['peak_rss_mb_main']:.0f} MB, "
                  f"worker {r['peak_rss_mb_worker']:.0f} MB")
        if len(workers) > 1:
            speedup = runs[workers[-1]]["tokens_per_s"] / runs[workers[0]]["tokens_per_s"]
            print(f"  speed-up {workers[0]} -> {workers[-1]} workers: x{speedup:.2f}")
        q, full = quarter, runs[workers[-1]]
        print(f"  memory vs size: 1/4 of the data peak worker RSS {q['peak_rss_mb_worker']:.0f} MB, all of it "
              f"{full['peak_rss_mb_worker']:.0f} MB")
    out = ROOT / "bench" / "results" / "prep_vs_raw_tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
