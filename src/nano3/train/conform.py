"""Conformance: what runs equals what params.yaml says, and params.yaml equals the recipe.

Two checks, one rule: every difference is either listed with its reason in `configs/deviations.yaml`
(the one place for intended deviations) or it is an error.
- `check_run`: a run's effective configuration (effective.py, read back from the live objects) against
  what its phase's spec (train.spec, built from params.yaml) asks for. Training runs it at start-up and refuses
  to train on a mismatch; `make conform` runs it again on the files the last runs left.
- `check_recipe`: a params file against the recipe document's table (../shared/reference): the
  production config `configs/nano3.yaml` must match it except for listed deviations.

    python -m nano3.train.conform [--params FILE]      (make conform)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nano3.config import load_params, yaml_load
from nano3.errors import UserError
from nano3.files import read_json
from nano3.train import effective
from nano3.train.effective import effective_path, expected, flatten

DEVIATIONS_FILE = Path(__file__).resolve().parents[3] / "configs" / "deviations.yaml"
PRODUCTION_PARAMS = Path(__file__).resolve().parents[3] / "configs" / "nano3.yaml"

# The recipe document's table (Stage 0: Pretraining, ../shared/reference/000_52b69612b09aa3bf.txt; FACTS.md).
RECIPE: dict[str, Any] = {
    "pretrain.tokens": 25e12,
    "pretrain.seq_length": 4096,
    "pretrain.global_batch_size": 8192,
    "pretrain.lr": 1e-4,
    "pretrain.min_lr": 1e-5,
    "pretrain.lr_style": "WSD",
    "pretrain.warmup_fraction": 0.8,       # "Warmup: 80% of training (20T tokens)"
    "pretrain.decay_start": 0.8,           # tech report: hold the peak LR to 80%, decay over the last 20%
    "pretrain.phase2_start": 0.94,         # phase 1 23.5T of 25T
    "pretrain.adam_beta1": 0.9,
    "pretrain.adam_beta2": 0.95,
    "pretrain.weight_decay": 0.1,
    "pretrain.moe_balancing": "aux-loss-free",   # DeepSeek: sigmoid scores + expert bias
    "model.preset": "nano3",
    "lc.tokens": 121e9,
    "lc.global_batch_size": 48,
    "lc.lr": 1e-5,
    "lc.lr_style": "constant",
    "lc.seq_length": 1048576,              # "up to 1M context"
    "lc.tp": 8, "lc.cp": 8, "lc.ep": 8, "lc.pp": 4,
}


@dataclass(frozen=True)
class Difference:
    key: str
    ours: Any
    reference: Any
    reason: str | None  # the listed reason, or None: an error

    def line(self, ours_name: str, reference_name: str) -> str:
        text = f"{self.key}: {ours_name} {self.ours!r}, {reference_name} {self.reference!r}"
        return f"{text} (intended: {self.reason})" if self.reason else text


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load_deviations(path: Path = DEVIATIONS_FILE) -> dict:
    if not path.exists():
        raise UserError(f"{path}: the intended-deviations file is missing; restore it from git")
    tree = yaml_load(path.read_text()) or {}
    for section in ("recipe", "backends"):
        if not isinstance(tree.get(section), dict):
            raise UserError(f"{path}: missing section '{section}' (a mapping)")
    return tree


def compare(ours: dict, reference: dict, listed: dict[str, str], skip: tuple[str, ...] = ()) -> list[Difference]:
    """Every key of `reference` whose value differs in `ours` (flattened), with its listed reason if any."""
    ours_flat, ref_flat = flatten(ours), flatten(reference)
    return [Difference(key, ours_flat.get(key), value, listed.get(key))
            for key, value in ref_flat.items() if key not in skip and not same(ours_flat.get(key), value)]


def raise_unlisted(differences: list[Difference], what: str, ours_name: str, reference_name: str) -> None:
    bad = [d for d in differences if d.reason is None]
    if bad:
        more = f" (and {len(bad) - 1} more: {'; '.join(d.line(ours_name, reference_name) for d in bad[1:])})" \
            if len(bad) > 1 else ""
        raise UserError(f"{what}: {bad[0].line(ours_name, reference_name)}{more}; set it in params.yaml, or list it "
                        f"with its reason in {DEVIATIONS_FILE.relative_to(DEVIATIONS_FILE.parents[1])}")


# ---- a run against params.yaml -------------------------------------------------------------------------------------

# Known only once the phase's last step ran: not checked at start-up.
AT_START_UNKNOWN = ("weight_decay_applied.last_step",)


def check_run(effective_doc: dict, spec: dict, deviations: dict | None = None,
              skip: tuple[str, ...] = ()) -> list[Difference]:
    """Compare one phase's effective configuration with what its spec (train.spec) asks for."""
    backend = effective_doc.get("backend", "megatron")
    listed = ((deviations or load_deviations()).get("backends") or {}).get(backend) or {}
    reference = expected(spec)
    if (effective_doc.get("allocator") or {}).get("expandable_segments") is not None:
        # the allocator runs what its environment asked (a setting read after it started would not be)
        reference["allocator"] = {"expandable_segments": effective_doc["allocator"]["asked"]["expandable_segments"]}
    return compare(effective_doc, reference, listed, skip)


def assert_run_conforms(effective_doc: dict, spec: dict, where: str) -> list[Difference]:
    """At start-up, before any step: refuse to train on a configuration params.yaml does not describe."""
    diffs = check_run(effective_doc, spec, skip=AT_START_UNKNOWN)
    raise_unlisted(diffs, f"{where}: the run does not use what {spec['source']} says", "running", "params")
    return diffs


class EffectiveConfigCallback:
    """A Megatron-Bridge callback: at start-up, write the effective configuration (rank 0) and refuse to
    train if it contradicts the phase's spec (every rank raises, so none waits on the others); record the
    weight decay applied at the phase's first and last step."""

    def __init__(self, spec: dict, run_dir: str, requested: dict | None = None):
        self.spec, self.run_dir = spec, run_dir
        self.phase, self.end_iter = spec["phase"]["name"], spec["phase"]["end_iter"]
        self.requested = requested  # filled by the dataset provider before training starts
        self.doc: dict | None = None

    def on_train_start(self, context) -> None:
        import torch.distributed as dist

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        message = [None]
        if rank0:
            env_keys = self.spec["derived"].get("environment_recorded", ())
            self.doc = effective.from_megatron(context, self.phase, self.requested or None, env_keys)
            effective.write(self.run_dir, self.phase, self.doc)
            try:
                assert_run_conforms(self.doc, self.spec, str(effective.effective_path(self.run_dir, self.phase)))
            except Exception as e:  # a UserError, or a broken read: no rank may train on it
                message = [str(e)]
        if dist.is_initialized():
            dist.broadcast_object_list(message, src=0)
        if message[0]:
            from nano3.errors import UserError

            raise UserError(message[0])

    def on_train_step_start(self, context) -> None:
        if self.doc is None:
            return
        it = context.state.train_state.step + 1
        if it == self.end_iter:
            self.doc["weight_decay_applied"]["last_step"] = effective.applied_weight_decay(context.optimizer.param_groups)
            self.doc["weight_decay_applied"]["last_iteration"] = it
            effective.write(self.run_dir, self.phase, self.doc)


# ---- params against the recipe ------------------------------------------------------------------------------------

def recipe_view(params) -> dict[str, Any]:
    """A params file in the recipe table's terms."""
    from nano3.model.presets import model_preset
    from nano3.schedule import build_schedule
    from nano3.train.plan import read_layout

    cfg = params.settings
    schedule = build_schedule(params.settings)
    pre = schedule.phases[0]
    lc = schedule.phase("lc")
    lc_layout = read_layout(params, "lc")
    preset = model_preset(params.settings.model)
    aux_free = preset.moe_router_score_function == "sigmoid" and preset.moe_router_enable_expert_bias
    return {
        "pretrain.tokens": schedule.pretrain_iters * pre.global_batch_size * pre.seq_length,
        "pretrain.seq_length": pre.seq_length, "pretrain.global_batch_size": pre.global_batch_size,
        "pretrain.lr": schedule.pretrain_lr.lr, "pretrain.min_lr": schedule.pretrain_lr.min_lr,
        "pretrain.lr_style": schedule.pretrain_lr.style,
        "pretrain.warmup_fraction": float(cfg.train.warmup_fraction),
        "pretrain.decay_start": float(cfg.train.decay_start), "pretrain.phase2_start": float(cfg.train.phase2_start),
        "pretrain.adam_beta1": float(cfg.train.adam_beta1), "pretrain.adam_beta2": float(cfg.train.adam_beta2),
        "pretrain.weight_decay": float(cfg.train.weight_decay),
        "pretrain.moe_balancing": "aux-loss-free" if aux_free else preset.moe_router_load_balancing_type,
        "model.preset": cfg.model.preset,
        "lc.tokens": schedule.lc_iters * lc.global_batch_size * lc.seq_length, "lc.global_batch_size": lc.global_batch_size,
        "lc.lr": schedule.lc_lr.lr, "lc.lr_style": schedule.lc_lr.style, "lc.seq_length": lc.seq_length,
        "lc.tp": lc_layout.tp, "lc.cp": lc_layout.cp, "lc.ep": lc_layout.ep, "lc.pp": lc_layout.pp,
    }


def check_recipe(params, deviations: dict | None = None) -> list[Difference]:
    """Differences between a params file and the recipe; reasons listed per model preset."""
    listed = ((deviations or load_deviations()).get("recipe") or {}).get(params.settings.model.preset) or {}
    ours = recipe_view(params)
    out = []
    for key, value in RECIPE.items():
        # Token budgets are whole batches: 25e12 / (8192 x 4096) rounds to 745,058 steps (1e-7 short).
        close = math.isclose(float(ours[key]), value, rel_tol=1e-4) if key.endswith(".tokens") else same(ours[key], value)
        if not close:
            out.append(Difference(key, ours[key], value, listed.get(key)))
    return out


def stale_listings(params, deviations: dict) -> list[str]:
    """Listed recipe deviations that are no longer deviations (the list must not hide future changes)."""
    listed = (deviations.get("recipe") or {}).get(params.settings.model.preset) or {}
    differing = {d.key for d in check_recipe(params, deviations)}
    return sorted(set(listed) - differing)


# ---- the command ---------------------------------------------------------------------------------------------------

def run_files(params) -> list[tuple[str, Path]]:
    """(phase, effective file) of the runs the stage manifests point at."""
    from nano3.train.rundir import manifest_path

    out = []
    for stage in ("pretrain", "lc"):
        path = manifest_path(params.settings.train, stage)
        if not path.exists():
            continue
        manifest = read_json(path, f"{stage} manifest")
        for phase in manifest.get("phases", []):
            out.append((phase["name"], effective_path(manifest["run_dir"], phase["name"])))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from nano3.schedule import build_schedule
    from nano3.train.backends.training_run import for_backend
    from nano3.train.spec import build as build_spec

    ap = argparse.ArgumentParser(prog="python -m nano3.train.conform", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=os.environ.get("NANO3_PARAMS", "params.yaml"))
    ap.add_argument("--recipe-only", action="store_true", help="check the params files only (make plan; no run needed)")
    args = ap.parse_args(argv)
    deviations = load_deviations()
    errors = []
    files = [args.params] + ([str(PRODUCTION_PARAMS)] if Path(args.params).resolve() != PRODUCTION_PARAMS else [])
    for name in files:
        params = load_params(name)
        diffs = check_recipe(params, deviations)
        listed = sum(d.reason is not None for d in diffs)
        print(f"recipe vs {name} (preset {params.settings.model.preset}): "
              f"{len(diffs) - listed} unlisted, {listed} intended deviations")
        for d in diffs:
            print(f"  {'ok ' if d.reason else 'ERR'} {d.line('ours', 'recipe')}")
        for key in stale_listings(params, deviations):
            errors.append(f"{DEVIATIONS_FILE.name}: recipe.{params.settings.model.preset}.{key} is listed but "
                          f"{name} matches the recipe there; remove the listing")
        errors += [f"{name}: {d.line('ours', 'recipe')}" for d in diffs if d.reason is None]

    params = load_params(args.params)
    found = [] if args.recipe_only else run_files(params)
    if not found and not args.recipe_only:
        print(f"runs: no training manifest under {params.settings.train.checkpoint_dir} yet (make pretrain)")
    for phase_name, path in found:
        if not path.exists():
            errors.append(f"{path}: missing; the run predates effective-config files, rerun its stage")
            continue
        doc = json.loads(path.read_text())
        backend = doc.get("backend", "megatron")
        effective_params = for_backend(params, backend)
        phase = build_schedule(effective_params.settings).phase(phase_name)
        diffs = check_run(doc, build_spec(effective_params, phase, path.parent, backend), deviations)
        listed = [d for d in diffs if d.reason]
        print(f"run {path}: {len(diffs) - len(listed)} unlisted differences from params, {len(listed)} intended")
        for d in diffs:
            print(f"  {'ok ' if d.reason else 'ERR'} {d.line('running', 'params')}")
        errors += [f"{path}: {d.line('running', 'params')}" for d in diffs if d.reason is None]
    if errors:
        raise UserError(f"{errors[0]}" + (f" (and {len(errors) - 1} more above)" if len(errors) > 1 else ""))
    print("conform: every difference is an intended, listed deviation")
    return 0


if __name__ == "__main__":
    import sys

    import nano3  # noqa: F401

    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
