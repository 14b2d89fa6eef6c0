"""Data preparation, end to end, side by side with Megatron-LM's tools: ours vs `tools/preprocess_data.py`
(and `tools/preprocess_data_fast.py`, gigatoken-based) on the same JSONL file, tokenizer and cores.

    python bench/prep_throughput.py --megatron-lm /path/to/Megatron-LM [--mb 200] [--workers 2] [--repeats 2]

Each run is a whole process timed from start to exit (imports included), with its peak RSS (the largest of
its processes); runs are interleaved and the median is printed, with ours as a ratio of each Megatron tool.
Input: this environment's site-packages `.py` files as one JSONL file of `--mb` MB (real text). Tokenizers:
the embedded SentencePiece BPE (`data/tokenizer`, built by `make smoke`) and, production-like, a byte-level
BPE of 131,072 tokens trained with HF `tokenizers` on that file's first 64 MB (the Nemotron tokenizer's kind and size).
Megatron's tools are skipped when no checkout is given. Results go to bench/results/prep_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))


def jsonl_corpus(mb: int) -> Path:
    """site-packages `.py` files, one JSON line each, sorted, cut at `mb` MB."""
    out = RESULTS / f"site-packages-{mb}mb.jsonl"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = mb << 20
    with open(f"{out}.tmp", "w") as f:
        for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                budget -= len(line)
                if budget <= 0:
                    break
    os.replace(f"{out}.tmp", out)
    return out


def bpe_131k(corpus: Path) -> Path:
    """A byte-level BPE of 131,072 tokens trained with `tokenizers` on the corpus, as nano3's tokenizer stage
    pins an HF tokenizer (tokenizer.json + info.json)."""
    out = RESULTS / "bpe-131k"
    if (out / "info.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nano3.data.tokenizers import save_huggingface

    def texts(limit: int = 64 << 20):  # the corpus's first 64 MB: enough for 131k merges, minutes not tens
        with open(corpus) as f:
            for line in f:
                limit -= len(line)
                if limit < 0:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=131072, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    src = Path(tempfile.mkdtemp(prefix="bpe131k."))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_pretrained(src)
    save_huggingface(str(src), out)
    return out


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Wall seconds and peak RSS (MB, the largest process of the tree) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def ours(corpus: Path, tokenizer: Path, workers: int, work: Path) -> tuple[list[str], dict]:
    params = work / "params.yaml"
    params.write_text(json.dumps({
        "tokenizer": {"dir": str(tokenizer)},
        "prep": {"out_dir": str(work / "out"), "work_dir": str(work / "work"), "workers": workers,
                 "valid_fraction": 0.001, "test_fraction": 0.001},
        "datasets": {"bench": {"source": str(corpus)}}}))
    return [sys.executable, str(ROOT / "stages" / "prep.py"), "bench", "--params", str(params), "--force"], {}


def megatron(tool: str, checkout: Path, corpus: Path, tokenizer: Path, workers: int, work: Path):
    info = json.loads((tokenizer / "info.json").read_text())
    kind = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tokenizer / "tokenizer.model")] \
        if info["kind"] == "sentencepiece" else ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                                 str(tokenizer)]
    cmd = [sys.executable, str(checkout / "tools" / tool), "--input", str(corpus), "--output-prefix",
           str(work / "megatron"), "--append-eod", *kind]
    if tool == "preprocess_data.py":
        cmd += ["--workers", str(workers)]
    else:  # the fast tool tokenizes whole files with gigatoken, on its own threads
        cmd += ["--use-gigatoken"]
    return cmd, {"PYTHONPATH": str(checkout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout (its tools/); omitted: ours only")
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokenizers", default="sentencepiece,bpe-131k")
    args = ap.parse_args()
    corpus = jsonl_corpus(args.mb)
    tokenizers = {"sentencepiece": ROOT / "data" / "tokenizer", "bpe-131k": None}
    tools = ["ours"]
    if args.megatron_lm:
        for tool in ("preprocess_data.py", "preprocess_data_fast.py"):
            if (args.megatron_lm / "tools" / tool).exists():
                tools.append(tool)
    report = {"machine": f"{os.cpu_count()} cores", "corpus": f"{corpus.name} ({corpus.stat().st_size / 2**20:.0f} MB)",
              "workers": args.workers, "results": {}}
    for name in args.tokenizers.split(","):
        tokenizer = tokenizers[name] or bpe_131k(corpus)
        if not (tokenizer / "info.json").exists():
            raise SystemExit(f"error: {tokenizer}/info.json missing; run `make smoke` first (it builds the tokenizer)")
        info = json.loads((tokenizer / "info.json").read_text())
        # preprocess_data_fast.py tokenizes files only with HF tokenizers (NotImplementedError otherwise)
        usable = [t for t in tools if not (t == "preprocess_data_fast.py" and info["kind"] != "huggingface")]
        runs: dict[str, list[dict]] = {t: [] for t in usable}
        for _ in range(args.repeats):
            for tool in usable:  # interleaved, so drift of the machine hits every tool alike
                with tempfile.TemporaryDirectory(prefix="prepbench.") as tmp:
                    cmd, extra = (ours(corpus, tokenizer, args.workers, Path(tmp)) if tool == "ours" else
                                  megatron(tool, args.megatron_lm, corpus, tokenizer, args.workers, Path(tmp)))
                    runs[tool].append(timed(cmd, {**os.environ, **extra}, Path(tmp)))
        medians = {t: {"seconds": statistics.median(r["seconds"] for r in rs),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": rs} for t, rs in runs.items()}
        report["results"][name] = medians
        print(f"\n{corpus.name}, tokenizer {name}, {args.workers} workers, median of {args.repeats}:")
        for tool, m in medians.items():
            ratio = "" if tool == "ours" else f"   ours is x{m['seconds'] / medians['ours']['seconds']:.2f} faster"
            print(f"  {tool:26s} {m['seconds']:7.1f} s   peak RSS {m['peak_rss_mb']:6.0f} MB{ratio}")
        RESULTS.mkdir(parents=True, exist_ok=True)  # after each tokenizer: a later failure keeps what ran
        (RESULTS / "prep_throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
