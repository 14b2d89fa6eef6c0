"""Raw text sources, cut into independent work units.

A dataset's `source` is one of:
- `hf://org/name[/subset]`: a Hugging Face Hub dataset, streamed with `datasets`
  (`prep.hf_mirror` points at a local directory holding hub repos as `org/name/...` instead);
- a local directory, file or glob of JSONL (`.jsonl`, `.json`, optionally `.gz`/`.zst`), Parquet,
  plain text (`.txt`, one document per file), or a `datasets.save_to_disk` directory.

Planning cuts a source into units whose boundaries depend only on the input files (row groups,
byte ranges, file groups, hub shards), never on the number of workers: each unit becomes one output
shard, which is what makes data preparation parallel, resumable and byte-identical for any worker count.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nano3.config.schema import nearest
from nano3.config.sections import DatasetSource, PrepConfig
from nano3.errors import UserError, brief

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class Unit:
    """One independent piece of a source; `start`/`stop` are row groups, bytes or rows by kind."""

    index: int
    kind: str  # parquet | jsonl | text | arrow | hf
    files: tuple[str, ...]
    start: int = 0
    stop: int = 0
    size: int = 0  # input bytes, for progress (0 when unknown)


@dataclass
class DatasetSpec:
    name: str
    source: str
    text_field: str = "text"
    split: str = "train"  # which split of a hub dataset or DatasetDict to read
    revision: str | None = None
    valid_fraction: float = 0.0
    test_fraction: float = 0.0
    min_chars: int = 0  # shorter documents are skipped ("short")
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_params(cls, params, name: str) -> "DatasetSpec":
        """The dataset `name` of params.yaml's `datasets`, its held-out shares defaulting to prep's."""
        cfg = params.settings.datasets.get(name)
        if cfg is None:
            raise UserError(f"{params.source}: no dataset '{name}' in `datasets`"
                            f"{nearest(name, list(params.settings.datasets), 'datasets')}")
        return cls.of(name, cfg, params.settings.prep)

    @classmethod
    def of(cls, name: str, cfg: DatasetSource, prep: PrepConfig) -> "DatasetSpec":
        """Shares left null take prep's; their sum was checked when params loaded (config.loader)."""
        valid = cfg.valid_fraction if cfg.valid_fraction is not None else prep.valid_fraction
        test = cfg.test_fraction if cfg.test_fraction is not None else prep.test_fraction
        return cls(name=name, source=cfg.source, text_field=cfg.text_field, split=cfg.split, revision=cfg.revision,
                   valid_fraction=float(valid), test_fraction=float(test), min_chars=cfg.min_chars)


def _is_save_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _suffix_kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


class TransientReadError(UserError):
    """A hub read that failed for the network's sake (a timeout, a dropped connection, HTTP 5xx or 429) after the
    libraries' own retries: worth reading the unit again later (prep.prepare_unit does, prep.unit_attempts times)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def transport_errors() -> tuple[type[BaseException], ...]:
    """A connection or read that broke, in the HTTP client the installed huggingface_hub uses: httpx from 1.0 on,
    requests before (the recipe image's 0.36). Neither is ours to declare: whichever the hub needs is there."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors += [requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError]
    return tuple(errors)


def is_transient(exc: BaseException | None) -> bool:
    """Whether an exception, or one it was raised from, is the network's fault rather than the data's."""
    transport = transport_errors()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, transport):
            return True
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def configure_hub_requests(timeout_s: float, retries: int, wait_s: float) -> None:
    """Streaming's per-request policy (prep.request_*), here and in the worker processes this one starts:
    huggingface_hub's timeout per HTTP request and datasets' retries of a read cut off mid-file."""
    import datasets
    import huggingface_hub.constants as hub

    os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = os.environ["HF_HUB_ETAG_TIMEOUT"] = str(max(1, round(timeout_s)))
    hub.HF_HUB_DOWNLOAD_TIMEOUT = hub.HF_HUB_ETAG_TIMEOUT = timeout_s
    datasets.config.STREAMING_READ_MAX_RETRIES = retries
    datasets.config.STREAMING_READ_RETRY_INTERVAL = wait_s


class Source:
    """A dataset's raw documents: plans units and reads the text field of each unit in batches."""

    def __init__(self, spec: DatasetSpec, hf_mirror: str | None = None):
        self.spec = spec
        self.hf_mirror = hf_mirror
        self.where = f"datasets.{spec.name}.source={spec.source}"

    # -- planning -------------------------------------------------------------------------------

    def plan(self, unit_bytes: int) -> list[Unit]:
        src = self.spec.source
        if src.startswith("hf://"):
            units = self._plan_hf()
        elif _is_save_to_disk(Path(src)):
            units = self._plan_arrow(unit_bytes)
        else:
            units = self._plan_files(unit_bytes)
        if not units:
            raise UserError(f"{self.where}: the dataset is empty; check the path or the split")
        return units

    def input_bytes(self) -> int:
        """Bytes of the local input files (0 for a hub dataset: its units are its shards)."""
        src = self.spec.source
        if src.startswith("hf://"):
            return 0
        if _is_save_to_disk(Path(src)):
            return sum(p.stat().st_size for p in Path(src).rglob("*.arrow"))
        return sum(Path(f).stat().st_size for f in self._local_files())

    def _local_files(self) -> list[str]:
        src = self.spec.source
        path = Path(src)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _suffix_kind(str(p)))
        elif path.is_file():
            files = [src]
        else:
            files = sorted(glob.glob(src, recursive=True))
            if not files:
                raise UserError(f"{self.where}: no such file or directory; fix the path or run the stage that makes it")
        if not files:
            raise UserError(f"{self.where}: no .jsonl/.json(.gz/.zst), .parquet or .txt files found")
        kinds = {_suffix_kind(f) for f in files}
        if None in kinds:
            bad = next(f for f in files if _suffix_kind(f) is None)
            raise UserError(f"{bad}: unsupported file type; use JSONL, Parquet or .txt")
        if len(kinds) > 1:
            raise UserError(f"{self.where}: mixes {sorted(kinds)} files; give each format its own dataset")
        return files

    def _plan_files(self, unit_bytes: int) -> list[Unit]:
        files = self._local_files()
        kind = _suffix_kind(files[0])
        units: list[Unit] = []
        if kind == "jsonl":
            for f in files:
                size = Path(f).stat().st_size
                if f.endswith((".gz", ".zst")) or size <= unit_bytes:
                    units.append(Unit(len(units), "jsonl", (f,), 0, size, size))
                else:  # plain JSONL splits at line boundaries found when reading
                    for start in range(0, size, unit_bytes):
                        stop = min(start + unit_bytes, size)
                        units.append(Unit(len(units), "jsonl", (f,), start, stop, stop - start))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            for f in files:
                try:
                    meta = pq.ParquetFile(f).metadata
                    names = meta.schema.to_arrow_schema().names
                except Exception as e:  # pyarrow raises several types for damaged files
                    raise UserError(f"{f}: not a readable Parquet file ({brief(e)}); re-download it") from None
                if self.spec.text_field not in names:
                    raise UserError(f"{f}: no column '{self.spec.text_field}' (has {names}); set datasets.{self.spec.name}.text_field")
                start, acc = 0, 0
                for rg in range(meta.num_row_groups):
                    acc += meta.row_group(rg).total_byte_size
                    if acc >= unit_bytes or rg == meta.num_row_groups - 1:
                        units.append(Unit(len(units), "parquet", (f,), start, rg + 1, acc))
                        start, acc = rg + 1, 0
        else:  # text: one document per file, files grouped by size
            group, acc = [], 0
            for f in files:
                group.append(f)
                acc += Path(f).stat().st_size
                if acc >= unit_bytes:
                    units.append(Unit(len(units), "text", tuple(group), 0, 0, acc))
                    group, acc = [], 0
            if group:
                units.append(Unit(len(units), "text", tuple(group), 0, 0, acc))
        return units

    def _load_arrow(self):
        import datasets

        try:
            ds = datasets.load_from_disk(self.spec.source)
        except Exception as e:
            raise UserError(f"{self.where}: not a readable save_to_disk directory ({brief(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.spec.split not in ds:
                raise UserError(f"{self.where}: no split '{self.spec.split}' (has {list(ds)}); set datasets.{self.spec.name}.split")
            ds = ds[self.spec.split]
        if self.spec.text_field not in ds.column_names:
            raise UserError(f"{self.where}: no column '{self.spec.text_field}' (has {ds.column_names}); "
                            f"set datasets.{self.spec.name}.text_field")
        return ds

    def _plan_arrow(self, unit_bytes: int) -> list[Unit]:
        ds = self._load_arrow()
        rows = len(ds)
        total = max(ds.data.nbytes, 1)
        per_unit = max(1, int(rows * unit_bytes / total))
        return [Unit(i, "arrow", (self.spec.source,), s, min(s + per_unit, rows), 0)
                for i, s in enumerate(range(0, rows, per_unit))]

    def _hf_repo(self) -> tuple[str, str | None]:
        parts = self.spec.source.removeprefix("hf://").strip("/").split("/")
        if len(parts) not in (2, 3):
            raise UserError(f"{self.where}: expected hf://org/name or hf://org/name/subset")
        return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)

    def _hf_stream(self, revision: str | None = None):
        import datasets

        repo, subset = self._hf_repo()
        path = str(Path(self.hf_mirror) / repo) if self.hf_mirror else repo
        if self.hf_mirror and not Path(path).is_dir():
            raise UserError(f"{self.where}: prep.hf_mirror has no copy at {path}; download it there or unset prep.hf_mirror")
        try:
            return datasets.load_dataset(path, name=subset, split=self.spec.split, streaming=True,
                                         revision=None if self.hf_mirror else revision or self.spec.revision)
        except Exception as e:
            raise UserError(f"{self.where}: cannot open the dataset ({type(e).__name__}: {brief(e, 200)}); "
                            f"check the name and subset, or set prep.hf_mirror to a local copy") from None

    def resolve_revision(self) -> str | None:
        """The commit the Hub serves for the dataset's `revision` (a branch, a tag or a commit; null: main), so
        every unit of a prep that runs for days reads that one commit and the manifest records it. None for a
        local mirror (prep.hf_mirror), which has no Hub history, and offline (HF_HUB_OFFLINE)."""
        import huggingface_hub.constants as hub

        if self.hf_mirror or hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            return None  # offline, `datasets` reads its cached copy: there is no Hub to ask
        from huggingface_hub import HfApi

        repo, _ = self._hf_repo()
        try:
            return HfApi().dataset_info(repo, revision=self.spec.revision).sha
        except Exception as e:
            raise UserError(f"{self.where}: cannot resolve revision {self.spec.revision or 'main'} on the Hub "
                            f"({type(e).__name__}: {brief(e, 200)}); check the name and revision, the token, or "
                            f"set prep.hf_mirror to a local copy") from None

    def _plan_hf(self) -> list[Unit]:
        commit = self.resolve_revision()
        n = self._hf_stream(commit).num_shards
        files = (self.spec.source, commit) if commit else (self.spec.source,)  # the commit every unit reads
        return [Unit(i, "hf", files, i, n, 0) for i in range(n)]

    # -- reading --------------------------------------------------------------------------------

    def read(self, unit: Unit, batch_size: int) -> Iterator[list]:
        """Yield lists of text values (None where a row's text is null) for one unit, in order."""
        reader = {"jsonl": self._read_jsonl, "parquet": self._read_parquet, "text": self._read_text,
                  "arrow": self._read_arrow, "hf": self._read_hf}[unit.kind]
        try:
            yield from reader(unit, batch_size)
        except UserError:
            raise
        except Exception as e:  # the same one-line contract for every source kind (pyarrow, datasets, ...)
            where = (f"{self.spec.source} shard {unit.start}" + (f" (mirror {self.hf_mirror})" if self.hf_mirror else "")
                     if unit.kind == "hf" else str(unit.files[0]))
            if unit.kind == "hf" and not self.hf_mirror and is_transient(e):
                raise TransientReadError(where, f"{type(e).__name__}: {brief(e, 300)}") from None
            raise UserError(f"{where}: unreadable data ({type(e).__name__}: {brief(e)}); re-download or fix it, "
                            f"or drop it from datasets.{self.spec.name}") from None

    def _missing_field(self, where: str, row) -> UserError:
        keys = list(row)[:8] if isinstance(row, dict) else type(row).__name__
        return UserError(f"{where}: no field '{self.spec.text_field}' (has {keys}); set datasets.{self.spec.name}.text_field")

    def _read_jsonl(self, unit: Unit, batch_size: int) -> Iterator[list]:
        path = unit.files[0]
        field_name = self.spec.text_field
        try:
            if path.endswith(".gz"):
                f = gzip.open(path, "rb")
            elif path.endswith(".zst"):
                import zstandard

                f = io.BufferedReader(zstandard.open(path, "rb"))
            else:
                f = open(path, "rb")
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror})") from None
        with f:
            pos = 0
            if unit.start > 0:
                f.seek(unit.start - 1)
                f.readline()  # finish the line holding byte start-1: ours begin at or after start
                pos = f.tell()
            batch, line_no = [], 0
            compressed = path.endswith((".gz", ".zst"))  # read whole; stop counts compressed bytes
            while compressed or pos < unit.stop:
                try:
                    line = f.readline()
                except Exception as e:  # gzip and zstd raise their own error types
                    raise UserError(f"{path}: corrupt compressed data ({brief(e)}); re-download it") from None
                if not line:
                    break
                where = f"{path}:{line_no + 1}" if unit.start == 0 else f"{path} (byte {pos})"
                pos += len(line)
                line_no += 1
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise UserError(f"{where}: invalid JSON ({getattr(e, 'msg', e)}); fix or drop the line") from None
                if not isinstance(row, dict) or field_name not in row:
                    raise self._missing_field(where, row)
                batch.append(row[field_name])
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def _read_parquet(self, unit: Unit, batch_size: int) -> Iterator[list]:
        import pyarrow.parquet as pq

        path = unit.files[0]
        try:
            pf = pq.ParquetFile(path)
            for rb in pf.iter_batches(batch_size=batch_size, row_groups=range(unit.start, unit.stop),
                                      columns=[self.spec.text_field]):
                yield rb.column(0).to_pylist()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: corrupt Parquet data ({brief(e)}); re-download it") from None

    def _read_text(self, unit: Unit, batch_size: int) -> Iterator[list]:
        batch = []
        for path in unit.files:
            try:
                batch.append(Path(path).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{path}: not UTF-8 text; convert it or remove it from the dataset") from None
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _read_arrow(self, unit: Unit, batch_size: int) -> Iterator[list]:
        ds = self._load_arrow().select_columns([self.spec.text_field]).with_format("arrow")
        for s in range(unit.start, unit.stop, batch_size):
            yield ds[s:min(s + batch_size, unit.stop)].column(0).to_pylist()

    def _read_hf(self, unit: Unit, batch_size: int) -> Iterator[list]:
        commit = unit.files[1] if len(unit.files) > 1 else None
        stream = self._hf_stream(commit).shard(num_shards=unit.stop, index=unit.start)
        for batch in stream.iter(batch_size=batch_size):
            if self.spec.text_field not in batch:
                raise self._missing_field(f"{self.spec.source} shard {unit.start}", batch)
            yield batch[self.spec.text_field]


def iter_texts(source: Source, unit_bytes: int = 1 << 30, batch_size: int = 1000) -> Iterator[str]:
    """Every non-empty document of a source, in order (for tokenizer training)."""
    for unit in source.plan(unit_bytes):
        for batch in source.read(unit, batch_size):
            yield from (t for t in batch if isinstance(t, str) and t.strip())


def hub_token(environ=None) -> str | None:
    """The Hugging Face token a process here would use: HF_TOKEN, else `hf auth login`'s token file."""
    import os

    environ = os.environ if environ is None else environ
    if environ.get("HF_TOKEN"):
        return environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def check_gated_access(params, names, token: str | None) -> None:
    """One line before anything streams (or any job is queued) when a gated hub dataset would be read without a
    token: the Hub answers 401 only once the job has started, hours later in a queue."""
    if params.settings.prep.hf_mirror or token:
        return
    gated = [n for n in names if n in params.settings.datasets and params.settings.datasets[n].gated
             and params.settings.datasets[n].source.startswith("hf://")]
    if gated:
        more = f" (and {len(gated) - 1} more: {', '.join(gated[1:4])}{', ...' if len(gated) > 4 else ''})" if len(gated) > 1 else ""
        raise UserError(f"{params.source}: datasets.{gated[0]}{more} is gated on the Hugging Face Hub "
                        f"({params.settings.datasets[gated[0]].source}) and no token is set: accept its terms on the "
                        f"dataset page, then run `hf auth login` or export HF_TOKEN (or set prep.hf_mirror to a local copy)")
