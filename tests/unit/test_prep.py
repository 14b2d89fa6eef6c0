"""Data preparation: exact read-back through megatron-core, determinism, resume, and clean failures."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nano3.data.prep import prepare_dataset, split_of
from nano3.data.shards import shard_prefix
from nano3.data.tokenizers import Encoder
from nano3.errors import UserError
from tests.conftest import ROOT
from tests.unit.test_sources import docs_from, write_jsonl


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def prepared_digest(out: Path) -> dict:
    """A prepared dataset's content: its manifest (but where its shards live) and every shard's bytes."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # the manifest alone: DVC's out
    return {"manifest": manifest, **tree_digest(Path(manifest.pop("shards_dir")))}


def read_split(manifest: dict, split: str) -> list[list[int]]:
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        ds = IndexedDataset(str(shard_prefix(manifest, shard)))
        assert len(ds.document_indices) - 1 == shard["documents"] == len(ds)
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def test_every_document_reads_back_as_tokenizer_output_plus_eod(tmp_path, sample_dir, spm_dir, params_factory):
    code = {"source": str(sample_dir / "stdlib-code"), "valid_fraction": 0.05, "test_fraction": 0.05}
    docs = {"source": str(sample_dir / "stdlib-docs"), "valid_fraction": 0.05, "test_fraction": 0.05}
    params = params_factory({"code": code, "docs": docs}, prep={"workers": 2})
    enc = Encoder(spm_dir)
    for name, sample in (("docs", None), ("code", 300)):
        manifest = prepare_dataset(params, name, sample_rows=sample, show_progress=False)
        texts = docs_from(sample_dir, f"stdlib-{name}", sample)
        expected = {"train": [], "valid": [], "test": []}
        for text, ids in zip(texts, enc.encode_batch(texts)):
            expected[split_of(text, 0.05, 0.05)[0]].append(ids + [enc.info.eod_id])
        out = tmp_path / "prepared" / name
        assert manifest["documents"] == len(texts) and manifest["dtype"] == "uint16"
        for split in ("train", "valid", "test"):
            assert read_split(manifest, split) == expected[split], f"{name}/{split} differs"
            assert manifest["splits"][split]["tokens"] == sum(map(len, expected[split]))
        assert all(expected[s] for s in expected)  # every split really holds documents
        for shard in manifest["splits"]["train"]["shards"]:  # checksums and sizes describe the files on disk
            data = Path(f"{shard_prefix(manifest, shard)}.bin").read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256_bin"] and len(data) == shard["bytes_bin"]
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
        assert Path(manifest["shards_dir"]).parent == tmp_path / "shards" / name


def test_int32_tokens_when_the_vocab_exceeds_65500(tmp_path, spm_dir, params_factory):
    big = tmp_path / "big_tok"
    shutil.copytree(spm_dir, big)
    info = json.loads((big / "info.json").read_text())
    (big / "info.json").write_text(json.dumps(info | {"vocab_size": 131072}))
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(20)])
    params = params_factory({"d": {"source": str(tmp_path / "d.jsonl")}}, tokenizer={"dir": str(big)})
    manifest = prepare_dataset(params, "d", show_progress=False)
    assert manifest["dtype"] == "int32"
    ds = IndexedDataset(str(shard_prefix(manifest, manifest["splits"]["train"]["shards"][0])))
    assert ds[0].dtype == np.int32


def test_one_and_four_workers_are_byte_identical(tmp_path, sample_dir, params_factory):
    outputs = []
    for workers in (1, 4):
        params = params_factory({"code": {"source": str(sample_dir / "stdlib-code"), "valid_fraction": 0.02}},
                                prep={"unit_mb": 2, "out_dir": str(tmp_path / f"out{workers}"),
                                      "shards_dir": str(tmp_path / f"shards{workers}"),
                                      "work_dir": str(tmp_path / f"work{workers}")})
        manifest = prepare_dataset(params, "code", workers=workers, show_progress=False)
        assert manifest["source"]["units"] >= 8  # enough units for four workers to interleave
        outputs.append(prepared_digest(tmp_path / f"out{workers}" / "code"))
    assert outputs[0] == outputs[1]


def write_params_file(path: Path, params) -> Path:
    path.write_text(yaml.safe_dump(dict(params)))
    return path


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(tmp_path, sample_dir, params_factory):
    dataset = {"code": {"source": str(sample_dir / "stdlib-code"), "valid_fraction": 0.02}}
    reference = params_factory(dataset, prep={"unit_mb": 2, "out_dir": str(tmp_path / "ref"),
                                              "shards_dir": str(tmp_path / "refshards"),
                                              "work_dir": str(tmp_path / "refwork")})
    prepare_dataset(reference, "code", workers=1, show_progress=False)

    params = params_factory(dataset, prep={"unit_mb": 2, "workers": 1})
    params_file = write_params_file(tmp_path / "params.yaml", params)
    cmd = [sys.executable, str(ROOT / "stages" / "prep.py"), "--params", str(params_file), "code"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    work = tmp_path / "work" / "code"
    deadline = time.time() + 300
    while len(list(work.glob("unit_*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("unit_*.json")))
    assert 3 <= done_before and not (tmp_path / "prepared" / "code").exists()  # nothing half-written is visible

    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    total = json.loads((tmp_path / "prepared" / "code" / "manifest.json").read_text())["source"]["units"]
    assert f"resuming, {done_before} of {total} units already done" in out.stdout
    assert prepared_digest(tmp_path / "prepared" / "code") == prepared_digest(tmp_path / "ref" / "code")


def test_work_left_by_other_prep_code_is_redone_not_resumed(tmp_path, sample_dir, params_factory, capsys):
    """DVC removes prep's out before rerunning it, but the work directory stays: its receipts must come from this
    code, or the manifest would carry counts the old code wrote under the new code's name in dvc.lock."""
    params = params_factory({"docs": {"source": str(sample_dir / "stdlib-docs")}}, prep={"unit_mb": 1, "workers": 1})
    clean = prepare_dataset(params, "docs", show_progress=False)
    out, work = tmp_path / "prepared" / "docs", tmp_path / "work" / "docs"
    receipt_file = sorted(work.glob("unit_*.json"))[0]

    def older_receipt_and_no_out():  # what a receipt of older code with another skipped reason looks like
        receipt = json.loads(receipt_file.read_text())
        receipt_file.write_text(json.dumps(receipt | {"skipped": receipt["skipped"] | {"retired_reason": 3}}))
        shutil.rmtree(out)

    older_receipt_and_no_out()  # same code: the receipt is resumed as it is (what resume is for)
    resumed = prepare_dataset(params, "docs", show_progress=True)
    assert "units already done" in capsys.readouterr().out and resumed["skipped"]["retired_reason"] == 3

    older_receipt_and_no_out()
    plan = json.loads((work / "plan.json").read_text())
    (work / "plan.json").write_text(json.dumps(plan | {"code": "0" * 16}))  # written by other prep code
    redone = prepare_dataset(params, "docs", show_progress=True)
    printed = capsys.readouterr().out
    assert "holds work of another plan or prep code; starting over" in printed and "already done" not in printed
    assert redone == clean and "retired_reason" not in redone["skipped"]


def test_sample_takes_the_first_n_rows_and_force_redoes(tmp_path, sample_dir, params_factory):
    params = params_factory({"docs": {"source": str(sample_dir / "stdlib-docs")}})
    m = prepare_dataset(params, "docs", sample_rows=250, show_progress=False)
    assert m["rows"] == 250 and m["documents"] == 250 and m["sample_rows"] == 250
    manifest_file = tmp_path / "prepared" / "docs" / "manifest.json"
    mtime = manifest_file.stat().st_mtime_ns
    assert prepare_dataset(params, "docs", sample_rows=250, show_progress=False) == m  # up to date: untouched
    assert manifest_file.stat().st_mtime_ns == mtime
    assert prepare_dataset(params, "docs", sample_rows=250, force=True, show_progress=False) == m
    assert manifest_file.stat().st_mtime_ns != mtime


def test_skipped_rows_are_counted_with_reasons(tmp_path, params_factory):
    rows = [{"text": "a real document"}, {"text": ""}, {"text": "   \n"}, {"text": None}, {"text": 7}, {"text": "another"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    m = prepare_dataset(params_factory({"d": {"source": str(tmp_path / "d.jsonl")}}), "d", show_progress=False)
    assert m["documents"] == 2 and m["rows"] == 6
    assert m["skipped"] == {"empty": 2, "null": 1, "not_string": 1, "short": 0}


def test_long_context_data_keeps_only_long_documents(tmp_path, params_factory):
    """datasets.<name>.min_chars: the lc blend's long documents; each shorter one is counted, none is cut."""
    rows = [{"text": "x" * n} for n in (10, 5000, 200, 12000, 4999)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    params = params_factory({"d": {"source": str(tmp_path / "d.jsonl"), "min_chars": 5000, "valid_fraction": 0,
                                   "test_fraction": 0}})
    m = prepare_dataset(params, "d", show_progress=False)
    assert m["documents"] == 2 and m["skipped"]["short"] == 3
    docs = IndexedDataset(str(shard_prefix(m, m["splits"]["train"]["shards"][0])))
    plain = prepare_dataset(params_factory({"e": {"source": str(tmp_path / "d.jsonl"), "valid_fraction": 0,
                                                  "test_fraction": 0}}), "e", show_progress=False)
    assert plain["documents"] == 5 and plain["skipped"]["short"] == 0
    whole = IndexedDataset(str(shard_prefix(plain, plain["splits"]["train"]["shards"][0])))
    kept = sorted(len(docs[i]) for i in range(len(docs)))  # the two long ones, tokenized exactly as without the filter
    assert kept == sorted(len(whole[i]) for i in (1, 3))
    params = params_factory({"d": {"source": str(tmp_path / "d.jsonl"), "min_chars": 20000}})
    with pytest.raises(UserError, match=r"datasets.d.min_chars=20000: all 5 documents are shorter"):
        prepare_dataset(params, "d", show_progress=False, force=True)


@pytest.mark.parametrize("bad", ["missing_field", "invalid_json", "all_empty"])
def test_bad_input_fails_in_one_line_and_leaves_no_dataset(tmp_path, params_factory, bad):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # good files first, so some units finish before the bad one
        write_jsonl(src / f"{i}.jsonl", [{"text": f"doc {i} {j}"} for j in range(10)])
    if bad == "missing_field":
        write_jsonl(src / "9.jsonl", [{"text": "x"}, {"body": "y"}])
    elif bad == "invalid_json":
        (src / "9.jsonl").write_text('{"text": "x"}\n{oops\n')
    else:
        for f in src.iterdir():
            f.unlink()
        write_jsonl(src / "9.jsonl", [{"text": " "}] * 5)
    params = params_factory({"d": {"source": str(src)}})
    params_file = write_params_file(tmp_path / "params.yaml", params)
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "prep.py"), "--params", str(params_file), "d"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in out.stderr
    assert {"missing_field": "9.jsonl:2: no field 'text'", "invalid_json": "9.jsonl:2: invalid JSON",
            "all_empty": "no non-empty documents"}[bad] in error_lines[0]
    assert not (tmp_path / "prepared" / "d").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_progress_is_a_line_at_a_fixed_interval_in_a_log(tmp_path, sample_dir, params_factory, capsys):
    """Not on a terminal (a Slurm log), rich would draw nothing until the end: plain lines instead."""
    params = params_factory({"code": {"source": str(sample_dir / "stdlib-code")}},
                            prep={"unit_mb": 2, "log_interval_s": 0})
    manifest = prepare_dataset(params, "code", workers=1, show_progress=True)
    units = manifest["source"]["units"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prep code: ")]
    assert len(lines) == units >= 4, lines
    assert lines[0].startswith(f"prep code: 1/{units} units, ") and lines[-1].startswith(f"prep code: {units}/{units}")
    assert lines[-1].split(", ")[2].endswith(" tokens")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_our_bin_idx_writer_gives_megatron_cores_bytes(tmp_path, dtype):
    """Issue 14: prep writes bin/idx without importing megatron-core (and torch); the files must be byte for byte
    what megatron-core's IndexedDatasetBuilder writes, documents and merged pieces (add_index) alike."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from nano3.data.binidx import BinIdxWriter, optimal_dtype

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(n), dtype=np.int64).astype(dtype) for n in rng.integers(1, 400, 50)]
    for tool, make in (("ours", BinIdxWriter), ("megatron", IndexedDatasetBuilder)):
        for piece, chunk in (("a", docs[:20]), ("b", docs[20:])):
            w = make(str(tmp_path / f"{tool}_{piece}.bin"), dtype=dtype)
            for d in chunk:
                w.add_document(d) if tool == "ours" else w.add_document(d, [len(d)])
            w.finalize(str(tmp_path / f"{tool}_{piece}.idx"))
        merged = make(str(tmp_path / f"{tool}_m.bin"), dtype=dtype)
        for piece in ("a", "b"):
            merged.add_index(str(tmp_path / f"{tool}_{piece}"))
        merged.finalize(str(tmp_path / f"{tool}_m.idx"))
    for name in ("a.bin", "a.idx", "b.idx", "m.bin", "m.idx"):
        assert (tmp_path / f"ours_{name}").read_bytes() == (tmp_path / f"megatron_{name}").read_bytes(), name
    read = IndexedDataset(str(tmp_path / "ours_m"))
    assert len(read) == 50 and all(np.array_equal(read[i], docs[i]) for i in (0, 19, 20, 49))
    for vocab in (8192, 65499, 65500, 131072):
        assert optimal_dtype(vocab) == DType.optimal_dtype(vocab)


def test_data_preparation_does_not_import_torch():
    """13 s of every prep run on 2 cores was importing megatron-core (torch) before any work."""
    code = ("import sys; import nano3.data.prep, nano3.data.sources, nano3.data.tokenizers; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_fast_encoder_writes_the_same_bytes_and_verify_catches_a_wrong_one(tmp_path, sample_dir, monkeypatch):
    """Issue 14: with a byte-level BPE (the production kind), `auto` prepares with gigatoken; the dataset is byte
    for byte the one the tokenizer's own library gives, with 1 or 8 workers (8 workers on 4 units: 2 encoder
    threads each). `--verify` re-encodes with the tokenizer and stops in one line where an encoder is wrong."""
    from nano3.data import tokenizers as tok_module
    from nano3.data.tokenizers import save_huggingface
    from nano3.errors import UserError
    from tests.conftest import make_params
    from tests.unit.test_tokenizer import hf_tokenizer_dir

    texts = docs_from(sample_dir, "stdlib-docs", 300)
    save_huggingface(str(hf_tokenizer_dir(tmp_path / "src", texts, vocab_size=2048, all_bytes=True)), tmp_path / "tok")
    datasets = {"code": {"source": str(sample_dir / "stdlib-code"), "valid_fraction": 0.02}}
    digests = {}
    for encoder, workers in (("reference", 1), ("auto", 1), ("auto", 8)):
        out = tmp_path / f"out-{encoder}-{workers}"
        params = make_params(tmp_path, tmp_path / "tok", datasets, prep={
            "encoder": encoder, "out_dir": str(out), "shards_dir": str(out / "shards"),
            "work_dir": str(tmp_path / f"work-{encoder}-{workers}")})
        manifest = prepare_dataset(params, "code", workers=workers, show_progress=False, verify=True)
        assert manifest["source"]["units"] == 4
        digests[(encoder, workers)] = prepared_digest(out / "code")
    assert digests[("reference", 1)] == digests[("auto", 1)] == digests[("auto", 8)]

    encode = tok_module.Encoder._encode_gigatoken_flat

    def drops_a_token(self, texts):  # an encoder that loses the first id of each batch
        flat, lengths = encode(self, texts)
        lengths[0] -= 1
        return flat[1:], lengths

    params = make_params(tmp_path, tmp_path / "tok", datasets, prep={
        "encoder": "gigatoken", "out_dir": str(tmp_path / "bad"), "work_dir": str(tmp_path / "bad-work")})
    monkeypatch.setattr(tok_module.Encoder, "_encode_gigatoken_flat", drops_a_token)
    monkeypatch.setattr("nano3.data.prep.choose_encoder", lambda *a: ("gigatoken", "forced"))
    with pytest.raises(UserError, match="prep code: encoder gigatoken gives other ids than the tokenizer in unit 0"):
        prepare_dataset(params, "code", workers=1, show_progress=False, verify=True)
    assert not (tmp_path / "bad" / "code").exists()


def test_auto_units_cut_one_large_file_for_every_worker_and_keep_the_output(tmp_path, sample_dir, params_factory,
                                                                             monkeypatch):
    """Issue 14: one large JSONL file is no longer one unit (one busy worker): `unit_mb: auto` cuts the input into
    about 64 units from its size alone, so 1 and 3 workers still write the same bytes. (The 16 MB floor is
    lowered here to keep the file small.)"""
    from nano3.data import prep as prep_module
    from nano3.errors import UserError

    monkeypatch.setattr(prep_module, "MIN_UNIT", 4096)
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": t} for t in docs_from(sample_dir, "stdlib-docs")])
    digests = []
    for workers in (1, 3):
        params = params_factory({"one": {"source": str(path)}}, prep={
            "unit_mb": "auto", "out_dir": str(tmp_path / f"out{workers}"), "shards_dir": str(tmp_path / f"s{workers}"),
            "work_dir": str(tmp_path / f"w{workers}")})
        manifest = prepare_dataset(params, "one", workers=workers, show_progress=False)
        assert manifest["source"]["units"] in range(60, 66), manifest["source"]["units"]
        digests.append(prepared_digest(tmp_path / f"out{workers}" / "one"))
    assert digests[0] == digests[1]
    with pytest.raises(UserError, match="'prep.unit_mb' must be a number or auto, got 'big'"):
        prepare_dataset(params_factory({"one": {"source": str(path)}}, prep={"unit_mb": "big"}), "one",
                        show_progress=False)
