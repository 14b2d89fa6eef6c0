"""Every source format reads the same documents, and every bad input is a one-line UserError."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nano3.data.sources import DatasetSpec, Source, iter_texts
from nano3.errors import UserError
from tests.conftest import write_hub_repo


def docs_from(sample_dir: Path, name: str, n: int | None = None) -> list[str]:
    texts = list(iter_texts(Source(DatasetSpec(name=name, source=str(sample_dir / name)))))
    return texts[:n] if n else texts


def read_all(spec: DatasetSpec, unit_bytes: int = 1 << 30, **kw) -> list:
    src = Source(spec, **kw)
    return [t for u in src.plan(unit_bytes) for batch in src.read(u, 7) for t in batch]


@pytest.fixture
def docs(sample_dir):
    return docs_from(sample_dir, "stdlib-docs", 60)


def write_jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.zst", zstandard.open)])
def test_jsonl_variants_read_every_document_in_order(tmp_path, docs, suffix, opener):
    write_jsonl(tmp_path / f"a{suffix}", [{"text": t, "id": i} for i, t in enumerate(docs[:30])], opener)
    write_jsonl(tmp_path / f"b{suffix}", [{"text": t} for t in docs[30:]], opener)
    assert read_all(DatasetSpec(name="d", source=str(tmp_path))) == docs


def test_plain_jsonl_byte_ranges_cover_each_line_exactly_once(tmp_path, docs):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in docs])
    spec = DatasetSpec(name="d", source=str(path))
    units = Source(spec).plan(unit_bytes=5000)
    assert len(units) > 5  # really cut into ranges, at arbitrary byte offsets
    assert read_all(spec, unit_bytes=5000) == docs


def test_parquet_row_group_units_and_glob(tmp_path, docs):
    for i in range(2):
        table = pa.table({"content": docs[i * 30:(i + 1) * 30]})
        pq.write_table(table, tmp_path / f"p{i}.parquet", row_group_size=4)
    spec = DatasetSpec(name="d", source=str(tmp_path / "*.parquet"), text_field="content")
    assert len(Source(spec).plan(unit_bytes=2000)) > 2
    assert read_all(spec, unit_bytes=2000) == docs


def test_text_files_are_one_document_each(tmp_path, docs):
    for i, t in enumerate(docs[:12]):
        (tmp_path / f"{i:03d}.txt").write_text(t)
    assert read_all(DatasetSpec(name="d", source=str(tmp_path)), unit_bytes=3000) == docs[:12]


def test_save_to_disk_directory(tmp_path, docs):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "ds")
    assert read_all(DatasetSpec(name="d", source=str(tmp_path / "ds")), unit_bytes=1000) == docs


def write_hub_layout(root: Path, docs: list[str]) -> Path:
    """A dataset repo laid out as on the Hub: README configs + per-subset Parquet files."""
    write_hub_repo(root / "nvidia" / "Nemotron-Fake", {
        subset: (subset, [{"text": chunk[i::2], "id": list(range(len(chunk[i::2])))} for i in range(2)])
        for subset, chunk in (("High-Quality", docs[:40]), ("Medium-Quality", docs[40:]))})
    return root


def test_hf_source_streams_a_hub_layout_mirror(tmp_path, docs):
    mirror = write_hub_layout(tmp_path, docs)
    spec = DatasetSpec(name="hq", source="hf://nvidia/Nemotron-Fake/High-Quality")
    units = Source(spec, hf_mirror=str(mirror)).plan(1 << 30)
    assert len(units) == 2  # one unit per data file
    got = read_all(spec, hf_mirror=str(mirror))
    assert got == docs[:40][0::2] + docs[:40][1::2]


CODE_V2 = ("Question-Answering", "Student-Teacher", "Code-Review", "Rewriting", "Transpilation")


def write_code_hub_layouts(root: Path, code: list[str]) -> dict[str, list[str]]:
    """The recipe's two code families laid out as on the Hub (as public download configs read them: marin's
    nemotron_v2.py): Nemotron-CC-Code-v1 with one default config, `data/*.parquet`; Nemotron-Pretraining-Code-v2
    with a README config per synthetic-code folder, and Nemotron-Code-Metadata, which lists GitHub files without
    their text. Returns the texts each hub source holds, by source."""
    cc = [code[i:20:2] for i in range(2)]
    write_hub_repo(root / "nvidia" / "Nemotron-CC-Code-v1",
                   {"default": ("data", [{"text": part, "id": [str(k) for k in range(len(part))]} for part in cc])})
    held = {"hf://nvidia/Nemotron-CC-Code-v1": cc[0] + cc[1]}
    configs = {}
    for k, name in enumerate(CODE_V2):
        texts = code[20 + 4 * k: 24 + 4 * k]
        configs[f"Synthetic-{name}"] = (f"Synthetic-Code/synthetic-{name.lower()}", [{"text": texts}])
        held[f"hf://nvidia/Nemotron-Pretraining-Code-v2/Synthetic-{name}"] = texts
    configs["Nemotron-Code-Metadata"] = ("Nemotron-Code-Metadata", [
        {"repo": ["python/cpython"], "commit_id": ["0" * 40], "rel_path": ["Lib/json/__init__.py"]}])
    write_hub_repo(root / "nvidia" / "Nemotron-Pretraining-Code-v2", configs)
    return held


def test_the_production_code_datasets_read_their_hub_layouts(tmp_path, sample_dir):
    """Issue 31: configs/nano3.yaml's code datasets, as written there, read a local copy in their Hub layout with
    the reader every hub dataset uses (no code-specific reader); the metadata-only config fails in one line."""
    from nano3.config import load_params
    from tests.conftest import ROOT

    code = docs_from(sample_dir, "stdlib-code", 40)
    held = write_code_hub_layouts(tmp_path, code)
    params = load_params(ROOT / "configs" / "nano3.yaml")
    names = [n for n, d in params.settings.datasets.items() if "Code" in d.source]
    assert sorted(DatasetSpec.from_params(params, n).source for n in names) == sorted(held)
    for name in names:
        spec = DatasetSpec.from_params(params, name)
        assert read_all(spec, hf_mirror=str(tmp_path)) == held[spec.source], name
    metadata = DatasetSpec(name="code-metadata", source="hf://nvidia/Nemotron-Pretraining-Code-v2/Nemotron-Code-Metadata")
    with pytest.raises(UserError) as err:
        read_all(metadata, hf_mirror=str(tmp_path))
    assert "no field 'text' (has ['repo', 'commit_id', 'rel_path'])" in one_line(err)


def test_a_truncated_file_in_a_hub_mirror_is_a_one_line_error(tmp_path, docs):
    """As for a local Parquet source: no 60-line pyarrow traceback from the streaming reader."""
    mirror = write_hub_layout(tmp_path, docs)
    part = mirror / "nvidia" / "Nemotron-Fake" / "High-Quality" / "part_1.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    spec = DatasetSpec(name="hq", source="hf://nvidia/Nemotron-Fake/High-Quality")
    with pytest.raises(UserError) as err:
        read_all(spec, hf_mirror=str(mirror))
    msg = one_line(err)
    assert msg.startswith(f"hf://nvidia/Nemotron-Fake/High-Quality shard 1 (mirror {mirror}): unreadable data")
    assert "datasets.hq" in msg


def test_hf_source_without_the_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"hf://nvidia/Nope: cannot open the dataset .*prep.hf_mirror"):
        Source(DatasetSpec(name="x", source="hf://nvidia/Nope")).plan(1 << 30)


# -- bad input ------------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as err:
        Source(DatasetSpec(name="d", source=str(tmp_path / "nope"))).plan(1 << 30)
    assert "datasets.d.source=" in one_line(err) and "no such file" in one_line(err)


def test_missing_text_field_names_file_line_and_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(UserError) as err:
        read_all(DatasetSpec(name="web", source=str(tmp_path)))
    msg = one_line(err)
    assert "a.jsonl:2" in msg and "no field 'text'" in msg and "datasets.web.text_field" in msg


def test_invalid_json_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(UserError) as err:
        read_all(DatasetSpec(name="d", source=str(tmp_path)))
    assert "a.jsonl:2: invalid JSON" in one_line(err)


def test_corrupt_parquet(tmp_path, docs):
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "a.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        Source(DatasetSpec(name="d", source=str(tmp_path))).plan(1 << 30)
    assert "a.parquet: not a readable Parquet file" in one_line(err)


def test_parquet_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError) as err:
        Source(DatasetSpec(name="d", source=str(tmp_path))).plan(1 << 30)
    assert "no column 'text'" in one_line(err) and "datasets.d.text_field" in one_line(err)


def test_corrupt_gzip(tmp_path, docs):
    path = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": t} for t in docs], gzip.open)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError) as err:
        read_all(DatasetSpec(name="d", source=str(tmp_path)))
    assert "a.jsonl.gz: corrupt compressed data" in one_line(err)


def test_empty_directory_and_mixed_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl"):
        Source(DatasetSpec(name="d", source=str(tmp_path / "empty"))).plan(1 << 30)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("b")
    with pytest.raises(UserError, match="mixes"):
        Source(DatasetSpec(name="d", source=str(tmp_path / "mixed"))).plan(1 << 30)
