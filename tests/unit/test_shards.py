"""Issue 31's storage design: shards outside DVC in a version directory per plan, checked against the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from nano3.blend.blend import build_blends
from nano3.data.prep import prepare_dataset
from nano3.data.shards import main as verify_data
from nano3.data.shards import shard_files
from nano3.errors import UserError
from tests.conftest import make_params


@pytest.fixture()
def docs(tmp_path, sample_dir, spm_dir):
    datasets = {"docs": {"source": str(sample_dir / "stdlib-docs"), "valid_fraction": 0.05, "test_fraction": 0.05}}
    params = make_params(tmp_path, spm_dir, datasets, prep={"unit_mb": 1},
                         blend={"phases": {"phase1": {"docs": 1.0}, "phase2": {"docs": 1.0}, "lc": {"docs": 1.0}},
                                "validate": False, "prebuild_cache": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(params)))
    return tmp_path, params, prepare_dataset(params, "docs", show_progress=False)


def verify(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    rc = verify_data(["--params", str(tmp_path / "params.yaml"), *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_rerun_of_the_same_plan_reuses_its_shards_and_another_plan_writes_beside_them(docs, spm_dir):
    tmp, params, first = docs
    files = [path for path, _, _ in shard_files(first)]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert prepare_dataset(params, "docs", show_progress=False) == first  # same plan: nothing rewritten
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    other = make_params(tmp, spm_dir, {"docs": {**params["datasets"]["docs"], "valid_fraction": 0.1}},
                        prep={"unit_mb": 1})
    second = prepare_dataset(other, "docs", show_progress=False)
    assert second["shards_dir"] != first["shards_dir"] and all(f.exists() for f in files)  # both versions kept
    (tmp / "prepared" / "docs" / "manifest.json").write_text(json.dumps(first))  # as `dvc checkout` puts it back
    assert prepare_dataset(params, "docs", show_progress=False) == first
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_a_missing_or_cut_shard_stops_the_blend_in_one_line_and_a_rerun_of_prep_restores_it(docs):
    tmp, params, manifest = docs
    path, size, _ = next(shard_files(manifest))
    os.truncate(path, size - 8)
    with pytest.raises(UserError, match=rf"{path}: {size - 8:,} bytes, but the manifest of dataset 'docs' says "
                                        rf"{size:,}; .*rerun `dvc repro -f prep@docs`"):
        build_blends(params, log=lambda *_: None)
    assert prepare_dataset(params, "docs", show_progress=False) == manifest  # its shards are written again
    assert path.stat().st_size == size
    build_blends(params, log=lambda *_: None)
    path.unlink()
    with pytest.raises(UserError, match=rf"{path}: missing, but the manifest of dataset 'docs' names it"):
        build_blends(params, log=lambda *_: None)


def test_verify_data_checks_sizes_quickly_and_every_byte_with_sha256(docs, capsys):
    tmp, _, manifest = docs
    rc, out = verify(tmp, capsys)
    assert rc == 0 and "1 datasets" in out and "(sizes)" in out
    path, size, _ = next(shard_files(manifest))
    with open(path, "r+b") as f:  # one byte changed in place: same size, other content
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify(tmp, capsys)[0] == 0  # the size check cannot see it ...
    rc, out = verify(tmp, capsys, "--sha256")  # ... every byte can
    assert rc == 1 and f"{path}: its sha256 differs from the manifest of dataset 'docs'" in out
    assert [line for line in out.splitlines() if "error" in line] == [out.splitlines()[-1]]  # one line
    rc, out = verify(tmp, capsys, "nosuch")  # a dataset never prepared: one line too, not a traceback
    assert rc == 1 and out.startswith("error: ") and "nosuch/manifest.json" in out and "Traceback" not in out


def test_prune_lists_then_removes_only_what_no_dataset_uses(docs, spm_dir, capsys):
    """Issue 31: a removed dataset left data/prepared/<name> (and its work and shards) behind, and old shard versions
    stayed forever. `make prune-data` lists them with their sizes; APPLY=1 removes them, and only them."""
    tmp, params, first = docs
    other = make_params(tmp, spm_dir, {"docs": {**params["datasets"]["docs"], "valid_fraction": 0.1}},
                        prep={"unit_mb": 1})
    second = prepare_dataset(other, "docs", show_progress=False)  # a new plan: a second shard version
    for root in ("prepared", "work", "shards"):  # a dataset removed from params.yaml since it was prepared
        (tmp / root / "gone" / ("v1" if root == "shards" else "")).mkdir(parents=True, exist_ok=True)
        (tmp / root / "gone" / "file").write_bytes(b"x" * 1000)
    (tmp / "params.yaml").write_text(yaml.safe_dump(dict(other)))

    rc, listed = verify(tmp, capsys, "--prune")
    assert rc == 0
    expected = sorted([str(tmp / "prepared" / "gone"), str(tmp / "work" / "gone"), str(tmp / "shards" / "gone"),
                       first["shards_dir"]])
    assert sorted(line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in listed.splitlines()
                  if line.startswith("unused: ")) == expected
    assert "prune-data: 4 folders" in listed and all(Path(p).exists() for p in expected)  # a dry run

    rc, removed = verify(tmp, capsys, "--prune", "--apply")
    assert rc == 0 and removed.count("removed: ") == 4 and not any(Path(p).exists() for p in expected)
    assert Path(second["shards_dir"]).exists() and (tmp / "prepared" / "docs" / "manifest.json").exists()
    assert verify(tmp, capsys)[0] == 0  # what is left still verifies
    assert "every folder is in use" in verify(tmp, capsys, "--prune")[1]


def test_tree_size_counts_each_file_once_and_no_link(tmp_path):
    """The one "bytes under a folder" of prune, reclaim and the start-up watch: a symlink (a run's `latest`, a
    shard linked from another version) is not a second copy, and a nested folder is walked."""
    from nano3.files import tree_size

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 1000)
    (tmp_path / "y.idx").write_bytes(b"0" * 24)
    (tmp_path / "latest").symlink_to(tmp_path / "a" / "x.bin")
    (tmp_path / "dir-link").symlink_to(tmp_path / "a", target_is_directory=True)
    assert tree_size(tmp_path) == (1024, 2)
    assert tree_size(tmp_path / "missing") == (0, 0)
