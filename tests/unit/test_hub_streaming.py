"""`hf://` datasets over HTTP (issue 31): the prep stage streams from a local Hub (tests/hub_server.py, the Hub's own
endpoints and layout) through datasets' and huggingface_hub's real code, not prep.hf_mirror; it records the commit
it read; and when the server fails or stalls on purpose it retries, then stops with one line naming the file and the
attempts, keeping the receipts of the units that finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from nano3.data.prep import receipt_path
from nano3.data.shards import MANIFEST
from tests.conftest import ROOT, make_params
from tests.hub_server import HubServer
from tests.unit.test_sources import docs_from, write_hub_layout

SOURCE = "hf://nvidia/Nemotron-Fake/High-Quality"


@pytest.fixture
def docs(sample_dir):
    return docs_from(sample_dir, "stdlib-docs", 60)


@pytest.fixture
def hub(tmp_path, docs):
    with HubServer(write_hub_layout(tmp_path / "hub", docs), stall_s=4) as server:
        yield server


def run_prep(tmp_path, spm_dir, hub_url: str, source: str = SOURCE, **prep) -> subprocess.CompletedProcess:
    """`stages/prep.py hq` in a process of its own (huggingface_hub reads HF_ENDPOINT when it is imported)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = make_params(tmp_path, spm_dir, {"hq": {"source": source, "watch": "src/nano3/data/sources.py"}},
                         prep={"workers": 2, "unit_mb": 1, "request_timeout_s": 1, "retry_wait_s": 0.2, **prep})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(params)))
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT / "src")}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, str(ROOT / "stages" / "prep.py"), "--params", str(tmp_path / "params.yaml"),
                           "hq"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_hub_dataset_streams_over_http_and_the_manifest_records_the_commit_read(tmp_path, spm_dir, hub):
    done = run_prep(tmp_path, spm_dir, hub.url)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "prepared" / "hq" / MANIFEST).read_text())
    commit = HubServer.commit(hub.root / "nvidia" / "Nemotron-Fake")
    assert manifest["source"]["revision"] is None and manifest["source"]["resolved_revision"] == commit
    assert manifest["rows"] == 40 and manifest["source"]["units"] == 2
    reads = [path for method, path in hub.requests if method == "GET" and path.endswith(".parquet")]
    assert reads and all(f"/resolve/{commit}/" in path for path in reads)  # every unit read that one commit

    missing = run_prep(tmp_path / "missing", spm_dir, hub.url, source="hf://nvidia/Nope")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "error: datasets.hq.source=hf://nvidia/Nope: cannot resolve revision main on the Hub (RepositoryNotFoundError")


def test_a_file_that_stalls_then_keeps_failing_is_retried_then_stops_prep_in_one_line_keeping_finished_units(
        tmp_path, spm_dir, hub):
    # huggingface_hub retries a request 5 times (1..8 s apart): 6 failures end one attempt of the unit, 12 both
    hub.fail("part_1.parquet", "stall", *["500"] * 11)
    failed = run_prep(tmp_path, spm_dir, hub.url, unit_attempts=2)
    assert failed.returncode != 0
    retried = [line for line in failed.stderr.splitlines() if "attempt 1/2 failed" in line]
    assert len(retried) == 1 and retried[0].startswith(f"prep hq: {SOURCE} shard 1: attempt 1/2 failed (")
    assert retried[0].endswith("reading the unit again in 0.2 s")
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {SOURCE} shard 1: gave up after 2 attempts over ")
    assert "part_1.parquet" in error and "500" in error and "prep.unit_attempts" in error
    assert not (tmp_path / "prepared" / "hq" / MANIFEST).exists()  # nothing half-written
    assert receipt_path(tmp_path / "work" / "hq", 0).exists()  # the unit that finished keeps its receipt
    assert not receipt_path(tmp_path / "work" / "hq", 1).exists()

    # once the server answers, a rerun tokenizes only the unit that failed
    kept = receipt_path(tmp_path / "work" / "hq", 0).read_bytes()
    resumed = run_prep(tmp_path, spm_dir, hub.url, unit_attempts=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming, 1 of 2 units already done" in resumed.stdout
    assert receipt_path(tmp_path / "work" / "hq", 0).read_bytes() == kept
    assert json.loads((tmp_path / "prepared" / "hq" / MANIFEST).read_text())["rows"] == 40


def test_a_broken_read_is_transient_in_either_http_client_the_hub_uses():
    """huggingface_hub >= 1.0 reads through httpx, the recipe image's 0.36 through requests: a connection cut or a
    stall in either is retried; a 404 or a bad file is the data's fault and stops at once."""
    import httpx
    import requests

    from nano3.data.sources import is_transient

    for cut in (httpx.ReadTimeout("stalled"), httpx.RemoteProtocolError("peer closed"),
                requests.ConnectionError("reset"), requests.ReadTimeout("stalled"),
                requests.exceptions.ChunkedEncodingError("cut mid-body")):
        try:
            try:
                raise cut
            except Exception as e:
                raise ValueError("parquet: unexpected end of stream") from e
        except ValueError as wrapped:
            assert is_transient(wrapped), cut  # the reader's own error, raised from the client's
    missing = requests.HTTPError("404")
    missing.response = type("R", (), {"status_code": 404})()
    busy = requests.HTTPError("503")
    busy.response = type("R", (), {"status_code": 503})()
    assert not is_transient(missing) and is_transient(busy) and not is_transient(ValueError("bad row"))
