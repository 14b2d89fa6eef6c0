"""`make exps`: DVC's experiments as a table that fits a terminal.

`dvc exp show` lists every parameter of params.yaml (about 200) and every dependency hash; even with
`--only-changed` the headline metrics alone are wider than 80 columns, and DVC cuts them to `…`. This reads the
same data (`dvc exp show --json`) and prints it transposed: a row per changed parameter and per headline metric
(the training stages' loss and validation loss, eval's test perplexity per dataset), a column per experiment,
in blocks that fit the width.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from nano3.errors import UserError
from nano3.train.effective import flatten


def columns(doc: list[dict]) -> list[tuple[str, dict, dict]]:
    """(name, params, metrics) of the workspace, each baseline commit and each of its experiments, as `dvc exp show
    --json` gives them; an experiment that failed or is queued has no data and is left out."""
    def one(name: str, data: dict | None):
        if not data:
            return []
        params = {k: v for f in (data.get("params") or {}).values() for k, v in flatten(f.get("data") or {}).items()}
        metrics = {k: v for f in (data.get("metrics") or {}).values() for k, v in flatten(f.get("data") or {}).items()}
        return [(name, params, metrics)]

    out = []
    for entry in doc:
        rev = entry["rev"]
        out += one(entry.get("name") or (rev if rev == "workspace" else rev[:7]), entry.get("data"))
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                out += one(rev.get("name") or rev["rev"][:7], rev.get("data"))
    return out


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(cols: list[tuple[str, dict, dict]], width: int = 80) -> str:
    """Rows: the parameters whose values differ between the columns, then every metric; columns in blocks."""
    keys = list(dict.fromkeys(k for _, params, _ in cols for k in params))
    changed = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for _, p, _ in cols}) > 1]
    metrics = list(dict.fromkeys(k for _, _, m in cols for k in m))
    rows = [(k, [cell(p.get(k)) for _, p, _ in cols]) for k in changed]
    rows += [(k, [cell(m.get(k)) for _, _, m in cols]) for k in metrics]
    label = min(max([len(k) for k, _ in rows] + [10]), 30)
    col = min(max([len(name) for name, _, _ in cols] + [max((len(v) for _, vs in rows for v in vs), default=1), 8]), 16)
    per_block = max(1, (width - label) // (col + 2))
    lines = []
    for start in range(0, len(cols), per_block):
        names = [name for name, _, _ in cols[start:start + per_block]]
        lines.append(f"{'':{label}}" + "".join(f"  {n[:col]:>{col}}" for n in names))
        lines.append(f"{'':{label}}" + "".join(f"  {'-' * col}" for _ in names))
        for key, values in rows:
            lines.append(f"{key[:label]:{label}}" + "".join(f"  {v[:col]:>{col}}"
                                                            for v in values[start:start + per_block]))
        lines.append("")
    return "\n".join(lines + ["every column: dvc exp show; two experiments side by side: dvc exp diff A B"])


def show(width: int | None = None) -> str:
    out = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if out.returncode:
        raise UserError(f"dvc exp show failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
    return render(columns(json.loads(out.stdout or "[]")), width or shutil.get_terminal_size((80, 24)).columns)
