"""Raw documents -> Megatron IndexedDataset shards (.bin/.idx), one dataset at a time.

Design, and why:
- The source is planned into units (sources.py) that depend only on the input; each unit is
  tokenized by one worker process into its own train/valid/test pieces (binidx.py writes megatron-core's
  IndexedDataset bytes without importing it, so no process pays for torch). Output therefore does not
  depend on the worker count, and memory is bounded by the batch and unit size, never by the dataset size.
- A document's split is chosen from a hash of its text: stable across reruns and worker counts,
  and duplicates never straddle train and test.
- Each finished unit leaves a receipt in the work directory, written after its files are renamed
  into place: a killed run restarts from the completed units, and nothing half-written is used. Only
  work of the same plan and the same prep code is resumed (`code_digest`): dvc.lock names the code that
  wrote every byte and count.
- The shards are assembled in a temporary directory and renamed whole, then the manifest is written: DVC tracks
  the manifest (with every shard's size and sha256), the shards live in `prep.shards_dir/<dataset>/<version>`
  outside DVC's cache (data/shards.py says why).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nano3.code import code_digest
from nano3.config.sections import PrepConfig
from nano3.data.binidx import BinIdxWriter
from nano3.data.shards import MANIFEST, check_shards
from nano3.data.sources import (
    DatasetSpec,
    Source,
    TransientReadError,
    Unit,
    check_gated_access,
    configure_hub_requests,
    hub_token,
)
from nano3.data.tokenizers import Encoder, choose_encoder, read_info
from nano3.errors import UserError
from nano3.files import atomic_dir, atomic_write_json, read_json, sha256_file

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 2  # 2: shards in prep.shards_dir, the manifest alone in prep.out_dir


@dataclass(frozen=True)
class PrepJob:
    """Everything a worker needs to turn one unit into shard pieces (picklable)."""

    spec: DatasetSpec
    prep: PrepConfig  # the `prep` knobs: batch bounds, the hub mirror, the streaming retry policy
    tokenizer_dir: str
    work_dir: str
    encoder: str = "reference"  # tokenizer.choose_encoder's pick: same ids, possibly faster
    threads: int = 1  # encoder threads per worker: the cores no other unit uses
    verify: bool = False  # encode every batch with the reference too, and fail on any difference

    @property
    def batch_chars(self) -> int:
        return int(self.prep.batch_mb) << 20


def split_of(text: str, valid_fraction: float, test_fraction: float) -> tuple[str, bytes]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    split = "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"
    return split, digest


# ---------------------------------------------------------------------------------------------
# Worker side

_worker: dict = {}


def _init_worker(job: PrepJob, progress_queue) -> None:
    if job.spec.source.startswith("hf://"):
        configure_hub_requests(job.prep.request_timeout_s, job.prep.request_retries, job.prep.retry_wait_s)
    reference = Encoder(job.tokenizer_dir) if job.verify and job.encoder != "reference" else None
    _worker.update(job=job, encoder=Encoder(job.tokenizer_dir, job.encoder, job.threads), reference=reference,
                   source=Source(job.spec, job.prep.hf_mirror), progress=progress_queue)


def unit_prefix(work_dir: str | Path, index: int, split: str) -> Path:
    return Path(work_dir) / f"unit_{index:06d}.{split}"


def receipt_path(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"unit_{index:06d}.json"


def char_bounded(texts: list[str], max_chars: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) slices of texts holding at most max_chars each (at least one text)."""
    slices, start, size = [], 0, 0
    for i, text in enumerate(texts):
        if i > start and size + len(text) > max_chars:
            slices.append((start, i))
            start, size = i, 0
        size += len(text)
    if start < len(texts):
        slices.append((start, len(texts)))
    return slices


def _tokenize_into(builders: dict, unit: Unit, row_limit: int | None) -> dict:
    """Stream the unit's rows through the tokenizer into the split builders; return the counts."""
    job: PrepJob = _worker["job"]
    encoder: Encoder = _worker["encoder"]
    progress = _worker["progress"]
    counts = {"rows": 0, "documents": dict.fromkeys(SPLITS, 0), "tokens": dict.fromkeys(SPLITS, 0),
              "skipped": {"null": 0, "not_string": 0, "empty": 0, "short": 0}}
    unit_digest = hashlib.blake2b(digest_size=16)
    for batch in _worker["source"].read(unit, job.prep.batch_size):
        if row_limit is not None:
            batch = batch[: row_limit - counts["rows"]]
        counts["rows"] += len(batch)
        texts, splits = [], []
        for text in batch:
            reason = "null" if text is None else "not_string" if not isinstance(text, str) else \
                "empty" if not text.strip() else "short" if len(text) < job.spec.min_chars else None
            if reason:
                counts["skipped"][reason] += 1
                continue
            split, digest = split_of(text, job.spec.valid_fraction, job.spec.test_fraction)
            unit_digest.update(digest)
            texts.append(text)
            splits.append(split)
        batch_tokens = 0
        for start, stop in char_bounded(texts, job.batch_chars):  # bounds memory whatever the document sizes
            documents = encoder.encode_documents(texts[start:stop])
            if _worker.get("reference") is not None:
                verify_batch(documents, _worker["reference"].encode_batch(texts[start:stop]), unit,
                             counts["rows"] - len(batch))
            for split, ids in zip(splits[start:stop], documents):
                builders[split].add_document(ids)
                counts["documents"][split] += 1
                counts["tokens"][split] += len(ids)
                batch_tokens += len(ids)
        if progress is not None:
            progress.put((len(texts), batch_tokens))
        if row_limit is not None and counts["rows"] >= row_limit:
            break
    counts["digest"] = unit_digest.hexdigest()
    return counts


def verify_batch(documents: list[np.ndarray], reference: list[list[int]], unit: Unit, first_row: int) -> None:
    """--verify: the encoder's ids (EOD aside) must be the tokenizer's own, document by document."""
    for i, (ours, theirs) in enumerate(zip(documents, reference)):
        if len(ours) != len(theirs) + 1 or not np.array_equal(ours[:-1], np.asarray(theirs, dtype=ours.dtype)):
            raise UserError(f"prep {_worker['job'].spec.name}: encoder {_worker['job'].encoder} gives other ids than "
                            f"the tokenizer in unit {unit.index} near row {first_row + i}; set prep.encoder: reference")


def prepare_unit(unit: Unit, row_limit: int | None = None) -> dict:
    """Tokenize one unit into its train/valid/test pieces; return (and save) its receipt. A hub unit whose read
    fails for the network's sake is read again from its start, `unit_attempts` times in all, with a doubling wait."""
    job: PrepJob = _worker["job"]
    started = time.time()
    for attempt in range(1, job.prep.unit_attempts + 1):
        try:
            return _prepare_unit_once(unit, row_limit)
        except TransientReadError as e:
            if attempt == job.prep.unit_attempts:
                raise UserError(f"{e.where}: gave up after {attempt} attempts over {time.time() - started:.0f} s "
                                f"(last: {e.reason}); finished units keep their receipts in {job.work_dir}: rerun "
                                f"prep to resume (prep.unit_attempts, prep.retry_wait_s, prep.request_timeout_s)") from None
            wait = job.prep.retry_wait_s * 2 ** (attempt - 1)
            print(f"prep {job.spec.name}: {e.where}: attempt {attempt}/{job.prep.unit_attempts} failed ({e.reason}); "
                  f"reading the unit again in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _prepare_unit_once(unit: Unit, row_limit: int | None) -> dict:
    job: PrepJob = _worker["job"]
    dtype = _worker["encoder"].info.token_dtype
    prefixes = {s: unit_prefix(job.work_dir, unit.index, s) for s in SPLITS}
    builders = {s: BinIdxWriter(f"{p}.bin.tmp", dtype=dtype) for s, p in prefixes.items()}
    try:
        counts = _tokenize_into(builders, unit, row_limit)
    except BaseException:
        for builder in builders.values():  # a failed unit leaves nothing behind
            builder.discard()
        raise
    sha, size = {}, {}
    for split, builder in builders.items():
        builder.finalize(f"{prefixes[split]}.idx.tmp")
        for ext in (".bin", ".idx"):
            os.replace(f"{prefixes[split]}{ext}.tmp", f"{prefixes[split]}{ext}")
            sha[f"{split}{ext}"] = sha256_file(f"{prefixes[split]}{ext}")
            size[f"{split}{ext}"] = os.path.getsize(f"{prefixes[split]}{ext}")
    receipt = {"unit": asdict(unit), **counts, "sha256": sha, "bytes": size}
    atomic_write_json(receipt_path(job.work_dir, unit.index), receipt)
    return receipt


# ---------------------------------------------------------------------------------------------
# Orchestration


CODE_MODULES = ("data/prep.py", "data/sources.py", "data/tokenizers.py", "data/binidx.py")  # a unit's bytes, receipt


def prep_code_digest() -> str:
    """Receipts written by other prep code are not resumed: they would pair the bytes and counts the old code wrote
    with the code dvc.lock records (a new `skipped` reason once went missing that way)."""
    return code_digest(CODE_MODULES)


def _plan_fingerprint(spec: DatasetSpec, units: list[Unit], tokenizer_fp: str, sample_rows: int | None) -> str:
    fields = asdict(spec)
    if not fields["min_chars"]:  # no filter: the fingerprint of datasets prepared before the filter existed
        del fields["min_chars"]
    doc = {"version": FORMAT_VERSION, "spec": fields, "units": [asdict(u) for u in units],
           "tokenizer": tokenizer_fp, "sample_rows": sample_rows}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _load_receipts(work_dir: Path, units: list[Unit]) -> dict[int, dict]:
    done = {}
    for unit in units:
        path = receipt_path(work_dir, unit.index)
        if not path.exists():
            continue
        receipt = json.loads(path.read_text())
        # a train piece is its shard's hard link: a shard cut short since cuts the piece too, which is then redone
        files_ok = all(os.path.exists(piece := f"{unit_prefix(work_dir, unit.index, s)}{ext}")
                       and os.path.getsize(piece) == receipt.get("bytes", {}).get(f"{s}{ext}")
                       for s in SPLITS for ext in (".bin", ".idx"))
        if receipt["unit"] == json.loads(json.dumps(asdict(unit))) and files_ok:  # JSON turns tuples to lists
            done[unit.index] = receipt
    return done


def _plan_matches(work_dir: Path, work_plan: dict) -> bool:
    plan_file = work_dir / "plan.json"
    return plan_file.exists() and json.loads(plan_file.read_text()) == work_plan


def _prepare_work_dir(work_dir: Path, work_plan: dict, force: bool, show_progress: bool) -> None:
    if force or not _plan_matches(work_dir, work_plan):
        if show_progress and not force and (work_dir / "plan.json").exists():
            print(f"prep: {work_dir} holds work of another plan or prep code; starting over")
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        atomic_write_json(work_dir / "plan.json", work_plan)
    for tmp in work_dir.glob("*.tmp"):  # left by a killed run
        tmp.unlink()


def _run_units(job: PrepJob, units: list[Unit], done: dict[int, dict], workers: int,
               sample_rows: int | None, show_progress: bool, log_interval_s: float) -> dict[int, dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [u for u in units if u.index not in done]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("units  {task.fields[docs]:,} docs  {task.fields[tokens]:,} tokens"), TimeElapsedColumn())
    # rich draws its bar only on a terminal; in a Slurm log it would print nothing until the end. There,
    # a plain line every `prep.log_interval_s` seconds instead.
    plain = show_progress and not sys.stderr.isatty()
    interval, started, last_line = log_interval_s, time.time(), [time.time()]
    with Progress(*columns, disable=not show_progress or plain, transient=False) as bar:
        task = bar.add_task(f"prep {job.spec.name}", total=len(units), completed=len(done), docs=0, tokens=0)
        counts = [0, 0]

        def drain(q) -> None:
            while True:
                try:
                    d, t = q.get_nowait()
                except queue.Empty:
                    break
                counts[0] += d
                counts[1] += t
            bar.update(task, docs=counts[0], tokens=counts[1])
            if plain and time.time() - last_line[0] >= interval:
                last_line[0] = time.time()
                print(f"prep {job.spec.name}: {int(bar.tasks[0].completed)}/{len(units)} units, {counts[0]:,} docs, "
                      f"{counts[1]:,} tokens, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

        if sample_rows is not None or workers <= 1:
            # In-process: --sample takes the first N rows in unit order, which is sequential by nature.
            q = queue.SimpleQueue()
            _init_worker(job, q)
            remaining = None if sample_rows is None else sample_rows - sum(r["rows"] for r in done.values())
            for unit in todo:
                if remaining is not None and remaining <= 0:
                    break
                receipt = prepare_unit(unit, remaining)
                done[unit.index] = receipt
                if remaining is not None:
                    remaining -= receipt["rows"]
                bar.advance(task)
                drain(q)
            return done

        # spawn, not fork: the encoders run thread pools (gigatoken, tokenizers) that a forked child inherits
        # without their threads and can deadlock on; a fresh worker costs 0.4 s of imports (no torch here)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(job, q)) as pool:
            pending = {pool.submit(prepare_unit, u): u for u in todo}
            try:
                while pending:
                    finished, _ = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                    drain(q)
                    for fut in finished:
                        unit = pending.pop(fut)
                        done[unit.index] = fut.result()
                        bar.advance(task)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        drain(q)
    return done


def _assemble(out_dir: Path, shards_dir: Path, work_dir: Path, units: list[Unit], receipts: dict[int, dict], dtype,
              describe: Callable[[dict], dict]) -> dict:
    """Link train pieces as shards and merge the small valid/test pieces into `shards_dir` (renamed into place
    whole), then write the manifest alone in `out_dir`, atomically."""
    splits: dict[str, dict] = {}
    with atomic_dir(shards_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
            shards = []
            used = [u for u in units if u.index in receipts and receipts[u.index]["documents"][split] > 0]
            if split == "train":
                for u in used:
                    name = f"train/shard_{u.index:06d}"
                    for ext in (".bin", ".idx"):
                        src = f"{unit_prefix(work_dir, u.index, split)}{ext}"
                        try:
                            os.link(src, tmp / f"{name}{ext}")
                        except OSError:
                            shutil.copyfile(src, tmp / f"{name}{ext}")
                    r = receipts[u.index]
                    shards.append({"prefix": name, "documents": r["documents"][split], "tokens": r["tokens"][split],
                                   "sha256_bin": r["sha256"]["train.bin"], "sha256_idx": r["sha256"]["train.idx"],
                                   **sizes(tmp / name)})
            elif used:
                name = f"{split}/shard_000000"
                builder = BinIdxWriter(tmp / f"{name}.bin", dtype=dtype)
                for u in used:
                    builder.add_index(str(unit_prefix(work_dir, u.index, split)))
                builder.finalize(str(tmp / f"{name}.idx"))
                shards.append({"prefix": name,
                               "documents": sum(receipts[u.index]["documents"][split] for u in used),
                               "tokens": sum(receipts[u.index]["tokens"][split] for u in used),
                               "sha256_bin": sha256_file(tmp / f"{name}.bin"),
                               "sha256_idx": sha256_file(tmp / f"{name}.idx"), **sizes(tmp / name)})
            splits[split] = {"documents": sum(s["documents"] for s in shards),
                             "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    manifest = {**describe(splits), "shards_dir": str(shards_dir)}
    with atomic_dir(out_dir) as tmp:  # the manifest alone: an older layout's shards here go with the old directory
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def sizes(prefix: Path) -> dict:
    return {f"bytes_{ext}": os.path.getsize(f"{prefix}.{ext}") for ext in ("bin", "idx")}


def shards_version(work_plan: dict) -> str:
    """The shard directory's name: the plan (source units, splits, tokenizer) and prep code that write them, so
    a rerun of the same plan finds its shards and another plan's stay beside them."""
    return hashlib.sha256(json.dumps(work_plan, sort_keys=True).encode()).hexdigest()[:16]


def current(manifest_file: Path, fingerprint: str) -> dict | None:
    """The manifest already written for this plan, if its shards are all there at their sizes."""
    if not manifest_file.exists():
        return None
    manifest = read_json(manifest_file, "manifest")
    if manifest.get("plan_fingerprint") != fingerprint or manifest.get("format_version") != FORMAT_VERSION:
        return None
    try:
        check_shards(manifest)
    except UserError:
        return None
    return manifest


def prepare_dataset(params, name: str, *, workers: int | None = None, sample_rows: int | None = None,
                    force: bool = False, show_progress: bool = True, step: str = "all",
                    units_of: tuple[int, int] | None = None, verify: bool = False) -> dict | None:
    """The prep stage for one dataset: returns its manifest (also written to `<out>/manifest.json`).

    `verify` encodes every document with the tokenizer's own library too and fails on any difference (the
    encoder actually used may be a faster one: tokenizer.choose_encoder).

    `step` splits the work for a Slurm job array: "plan" resets the work directory for this plan,
    "units" tokenizes the units i, i+n, ... of `units_of=(i, n)` without assembling, "assemble"
    writes the dataset once every unit has its receipt. "all" does the three in one process.
    """
    spec = DatasetSpec.from_params(params, name)
    return prepare(spec, params.settings.prep, params.settings.tokenizer.dir, workers, sample_rows, force,
                   show_progress, step, units_of, verify)


AUTO_UNITS = 64  # `unit_mb: auto` cuts a dataset into about this many units: up to 64 workers stay busy
MIN_UNIT, MAX_UNIT = 16 << 20, 1 << 30


def unit_bytes(unit_mb, source: Source) -> int:
    """Unit size in bytes: `prep.unit_mb` MB, or (auto) the local input's size / 64, within 16 MB .. 1 GB.

    Derived from the input alone, never from the worker count: units are the shards, and the output must be
    the same bytes for any number of workers. A 200 MB JSONL file becomes 13 units, not one."""
    if unit_mb != "auto":
        if not isinstance(unit_mb, (int, float)) or unit_mb <= 0:
            raise UserError(f"prep.unit_mb={unit_mb!r} must be a positive number of MB or 'auto'")
        return int(unit_mb * (1 << 20))
    return min(MAX_UNIT, max(MIN_UNIT, -(-source.input_bytes() // AUTO_UNITS)))


PROBE_CHARS = 1 << 20


def _probe(source: Source, unit: Unit, batch_size: int) -> list[str]:
    """The dataset's first documents, about 1 MB of text: what choose_encoder compares the encoders on (a
    sanity check of seconds; the whole-corpus check is --verify)."""
    for batch in source.read(unit, batch_size):
        texts = [t for t in batch if isinstance(t, str) and t.strip()]
        return texts[:char_bounded(texts, PROBE_CHARS)[0][1]] if texts else []
    return []


def prepare(spec: DatasetSpec, prep: PrepConfig, tokenizer_dir: str, workers: int | None, sample_rows: int | None,
            force: bool, show_progress: bool, step: str, units_of: tuple[int, int] | None,
            verify: bool = False) -> dict | None:
    name = spec.name
    out_dir = Path(prep.out_dir) / name
    work_dir = Path(prep.work_dir) / name
    tok = read_info(tokenizer_dir)
    if sample_rows is None:
        sample_rows = prep.sample_rows
    workers = workers or prep.workers or os.cpu_count() or 1  # 0 / None: all cores
    source = Source(spec, prep.hf_mirror)
    if spec.source.startswith("hf://"):
        configure_hub_requests(prep.request_timeout_s, prep.request_retries, prep.retry_wait_s)
    units = source.plan(unit_bytes(prep.unit_mb, source))
    fingerprint = _plan_fingerprint(spec, units, tok.fingerprint, sample_rows)
    work_plan = {"fingerprint": fingerprint, "code": prep_code_digest()}  # what the work directory's receipts are of

    shards_dir = Path(prep.shards_dir) / name / shards_version(work_plan)
    if step in ("all", "plan") and not force and (manifest := current(out_dir / MANIFEST, fingerprint)):
        return manifest

    if step in ("all", "plan"):
        _prepare_work_dir(work_dir, work_plan, force, show_progress)
        if step == "plan":
            return None
    else:  # array tasks and the assembly never reset the shared work directory: the plan step did
        if not _plan_matches(work_dir, work_plan):
            raise UserError(f"{work_dir / 'plan.json'}: missing, or for another plan or prep code; run `stages/prep.py {name} --plan-only` "
                            f"before the array tasks (python -m nano3.launch does)")
        if sample_rows is not None:
            raise UserError("--sample is sequential by nature; run it as one job, not as an array")
    done = _load_receipts(work_dir, units)
    if step == "assemble":
        missing = [u.index for u in units if u.index not in done]
        if missing:
            raise UserError(f"prep {name}: units {missing[:10]} have no receipt in {work_dir}; an array task failed "
                            f"or has not run: rerun them")
        receipts = done
    else:
        if done and show_progress:
            print(f"prep {name}: resuming, {len(done)} of {len(units)} units already done")
        mine = units if units_of is None else [u for u in units if u.index % units_of[1] == units_of[0]]
        mine_done = {u.index: done[u.index] for u in mine if u.index in done}
        batch_size = prep.batch_size
        encoder, why = choose_encoder(tokenizer_dir, prep.encoder,
                                      lambda: _probe(source, units[0], batch_size))
        if show_progress:
            print(f"prep {name}: encoder {why}")
        left = max(1, len(mine) - len(mine_done))
        job = PrepJob(spec=spec, prep=prep, tokenizer_dir=tokenizer_dir, work_dir=str(work_dir), encoder=encoder,
                      threads=max(1, workers // left) if sample_rows is None else workers,
                      verify=bool(verify or prep.verify_encoder))
        receipts = _run_units(job, mine, mine_done, max(1, min(workers, len(mine))), sample_rows, show_progress,
                              float(prep.log_interval_s))
        if step == "units":
            return None

    # the Hub commit every unit read (sources.Source.resolve_revision); None from a local mirror
    read_commit = units[0].files[1] if units[0].kind == "hf" and len(units[0].files) > 1 else None
    unit_digests = hashlib.sha256("".join(receipts[i]["digest"] for i in sorted(receipts)).encode()).hexdigest()[:16]
    documents = sum(sum(r["documents"].values()) for r in receipts.values())
    if documents == 0:
        short = sum(r["skipped"].get("short", 0) for r in receipts.values())
        if short:
            raise UserError(f"datasets.{name}.min_chars={spec.min_chars}: all {short:,} documents are shorter; "
                            f"lower it")
        raise UserError(f"datasets.{name}.source={spec.source}: no non-empty documents in field "
                        f"'{spec.text_field}'; check the field name and the data")
    skipped: dict[str, int] = {}
    for r in receipts.values():
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v

    def describe(splits: dict) -> dict:
        return {
            "dataset": name, "format_version": FORMAT_VERSION, "plan_fingerprint": fingerprint,
            "source": {"source": spec.source, "text_field": spec.text_field, "split": spec.split,
                       "revision": spec.revision, "units": len(units), "content_fingerprint": unit_digests,
                       **({"resolved_revision": read_commit} if spec.source.startswith("hf://") else {})},
            "tokenizer": {"kind": tok.kind, "source": tok.source, "fingerprint": tok.fingerprint,
                          "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
            "dtype": np.dtype(tok.token_dtype).name, "sample_rows": sample_rows,
            "rows": sum(r["rows"] for r in receipts.values()), "documents": documents,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "skipped": skipped,
            "valid_fraction": spec.valid_fraction, "test_fraction": spec.test_fraction,
            "splits": splits,
        }

    return _assemble(out_dir, shards_dir, work_dir, units, receipts, tok.token_dtype, describe)


def add_options(parser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="processes (default prep.workers)")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="only the first N rows per dataset")
    parser.add_argument("--force", action="store_true", help="ignore finished work and redo the dataset")
    parser.add_argument("--verify", action="store_true",
                        help="also encode every document with the tokenizer's own library; fail on any difference")
    parser.add_argument("--plan-only", action="store_true", help="(job arrays) reset the work directory for this plan")
    parser.add_argument("--units", metavar="I/N", help="(job arrays) tokenize units I, I+N, ... and stop")
    parser.add_argument("--assemble", action="store_true", help="(job arrays) write the dataset from the units")


def run(params, args) -> dict:
    """Stage `prep@<dataset>`: the datasets named on the command line; returns their manifests by name."""
    if not args.names:
        raise UserError("prep: name at least one dataset (a key of `datasets` in params.yaml)")
    step = "plan" if args.plan_only else "assemble" if args.assemble else "units" if args.units else "all"
    units_of = tuple(int(x) for x in args.units.split("/")) if args.units else None
    if step in ("plan", "all"):  # the steps that read the source first
        check_gated_access(params, args.names, hub_token())
    manifests = {}
    for name in args.names:
        m = prepare_dataset(params, name, workers=args.workers, sample_rows=args.sample, force=args.force,
                            step=step, units_of=units_of, verify=args.verify)
        manifests[name] = m
        if m is None:
            print(f"prep {name}: {step} step done")
            continue
        split = ", ".join(f"{s} {d['documents']:,} docs/{d['tokens']:,} tokens" for s, d in m["splits"].items())
        skipped = sum(m["skipped"].values())
        print(f"prep {name}: {split}; skipped {skipped:,} ({m['skipped']}); dtype {m['dtype']}")
    return manifests
