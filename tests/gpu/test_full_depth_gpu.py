"""Issue 33: the full-depth Nano 3 (52 layers, real widths, 131k vocabulary) through the real export and eval stage
scripts on one GPU, each within the plan's estimate (bench/full_depth.py; 8 experts keep it to ~4 minutes and 15 GiB of
disk). The full 128-expert model's estimate must fit an 80 GB GPU with headroom."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu


def test_full_depth_export_and_eval_fit_the_plans_estimates(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import full_depth

    result = full_depth.main(["--experts", "8", "--work", str(tmp_path)])
    print(json.dumps(result, indent=1))  # the figures docs/benchmarks.md records
    point = result["points"][0]
    for stage in ("export", "eval"):
        estimate, peak = point["estimate"][stage]["gpu_gib"], point[stage]["gpu_peak_gib"]
        assert abs(peak - estimate) <= 0.1 * peak, (stage, peak, estimate)
        assert point[stage]["host_peak_gib"] <= point["estimate"][stage]["host_gib"] * 1.1, (stage, point[stage])
    assert point["logits_check"]["tokens"] == 4096 and point["logits_check"]["rel_l2"] < 0.5
    assert set(point["eval_results"]["retrieval"]) == {"4096", "65536"}
    assert len(point["eval_results"]["loss_by_position"]) == 16
    for stage in ("export", "eval"):
        assert result["estimate_128"][stage]["gpu_gib"] < 76, result["estimate_128"]  # 80 GB GPU, 4 GiB to spare
