"""The blend stage: per-phase blend files, the report, and megatron-core's check of each blend."""

from __future__ import annotations

from pathlib import Path

from nano3.blend.report import write_report
from nano3.blend.spec import PHASES, blend_rows, held_out_gaps, load_manifests, per_split_blend, phase_weights
from nano3.data.megatron import build_phase, megatron_tokenizer, split_sizes
from nano3.data.tokenizers import read_info
from nano3.errors import UserError
from nano3.files import atomic_write_json
from nano3.schedule import build_schedule


def build_blends(params, log=print) -> dict:
    """Write `<blend.out_dir>/{phase1,phase2,lc}.json`, report.{md,csv,png}; validate; return a summary."""
    out_dir = Path(params.settings.blend.out_dir)
    plans = {p.name: p for p in build_schedule(params.settings).phases}  # phase2 is absent when it has no iterations
    weights = {phase: phase_weights(params, phase) for phase in PHASES}
    manifests = load_manifests(params, {name for w in weights.values() for name in w})
    tokenizer_dir = params.settings.tokenizer.dir
    info = read_info(tokenizer_dir)
    fingerprint = next(iter(manifests.values()))["tokenizer"]["fingerprint"]
    if fingerprint != info.fingerprint:
        raise UserError(f"{tokenizer_dir}: tokenizer {info.fingerprint} differs from the one the datasets were "
                        f"prepared with ({fingerprint}); rerun prep (dvc repro) so data and tokenizer match")

    out_dir.mkdir(parents=True, exist_ok=True)
    rows, gaps, summary = [], [], {"phases": {}, "tokenizer": fingerprint}
    for phase in PHASES:
        phase_tokens = plans[phase].tokens if phase in plans else 0
        blend = per_split_blend(manifests, weights[phase])
        if blend["valid"] is None:
            log(f"blend {phase}: no dataset has validation documents; training will skip validation")
        atomic_write_json(out_dir / f"{phase}.json", blend)
        rows += blend_rows(phase, manifests, weights[phase], phase_tokens)
        gaps += held_out_gaps(manifests, weights[phase], phase)
        summary["phases"][phase] = {"datasets": weights[phase], "tokens": phase_tokens}

    max_epochs = float(params.settings.blend.max_epochs)
    report_dir = Path(params.settings.blend.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    for warning in write_report(rows, max_epochs, report_dir, gaps):
        log(f"warning: {warning}")
    if params.settings.blend.strict_epochs and (over := [r for r in rows if r.epochs > max_epochs]):
        raise UserError(f"blend.strict_epochs: {len(over)} dataset(s) above blend.max_epochs={max_epochs:g}, e.g. "
                        f"{over[0].phase}: {over[0].dataset} read {over[0].epochs:.2f} times; lower its weight, the "
                        f"phase's tokens, or add data (report: {report_dir / 'report.md'})")

    cache_dir = Path(params.settings.blend.cache_dir)  # kept: megatron-core names each entry by what built it
    prebuild = params.settings.blend.prebuild_cache
    if params.settings.blend.validate or prebuild:
        tokenizer = megatron_tokenizer(tokenizer_dir, info)
        cfg = params.settings
        for phase in PHASES:
            plan = plans.get(phase)
            if plan is None:
                continue
            sizes = split_sizes(plan, cfg.train.eval_interval, cfg.train.eval_iters)
            lengths = build_phase(out_dir / f"{phase}.json", seq_length=plan.seq_length, seed=cfg.train.seed,
                                  sizes=sizes, tokenizer=tokenizer, cache_dir=cache_dir if prebuild else None)
            summary["phases"][phase]["samples"] = dict(zip(("train", "valid", "test"), lengths))
            log(f"blend {phase}: megatron-core built train/valid/test = {lengths} samples of {plan.seq_length} tokens"
                + (" (index cache written)" if prebuild else ""))
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def run(params, args) -> dict:
    """Stage `blend`."""
    summary = build_blends(params)
    for phase, info in summary["phases"].items():
        shares = ", ".join(f"{n} {w:.0%}" for n, w in info["datasets"].items())
        print(f"blend {phase}: {info['tokens']:,} tokens from {shares}")
    return summary
