"""The blend report: per phase and dataset, its tokens, share and the epochs the budget implies.

Written as Markdown (read it), CSV (`dvc plots show` draws the shares) and a PNG bar chart with
over-repeated datasets in red, because a blend is easier to judge as a picture than as numbers.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nano3.blend.spec import BlendRow
from nano3.files import atomic_save_figure, atomic_write_text


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def warnings_for(rows: list[BlendRow], max_epochs: float) -> list[str]:
    return [f"{r.phase}: {r.dataset} would be read {r.epochs:.2f} times (> blend.max_epochs={max_epochs:g}); "
            f"lower its weight, the phase's tokens, or add data" for r in rows if r.epochs > max_epochs]


def markdown(rows: list[BlendRow], max_epochs: float, extra: list[str] = ()) -> str:
    lines = ["# Blend report", "",
             "Share = token share within the phase; epochs = share x phase tokens / dataset train tokens.", "",
             "| phase | dataset | share | dataset tokens | phase tokens | tokens drawn | epochs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        flag = " **!**" if r.epochs > max_epochs else ""
        lines.append(f"| {r.phase} | {r.dataset} | {r.share:.1%} | {_human(r.dataset_tokens)} | "
                     f"{_human(r.phase_tokens)} | {_human(r.drawn_tokens)} | {r.epochs:.2f}{flag} |")
    if warns := [*warnings_for(rows, max_epochs), *extra]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warns]
    return "\n".join(lines) + "\n"


def shares_csv(rows: list[BlendRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["phase_dataset", "phase", "dataset", "share", "epochs", "dataset_tokens"])
    for r in rows:
        writer.writerow([f"{r.phase}/{r.dataset}", r.phase, r.dataset, f"{r.share:.6f}", f"{r.epochs:.6f}", r.dataset_tokens])
    return out.getvalue()


def plot(rows: list[BlendRow], max_epochs: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(r.phase for r in rows))
    n_datasets = len({r.dataset for r in rows})
    fig, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 1.0 + 0.35 * n_datasets), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        sel = [r for r in rows if r.phase == phase]
        colors = ["tab:red" if r.epochs > max_epochs else "tab:blue" for r in sel]
        ax.barh([r.dataset for r in sel], [100 * r.share for r in sel], color=colors)
        for i, r in enumerate(sel):
            ax.text(100 * r.share, i, f" {r.epochs:.2f} ep", va="center", fontsize=8)
        ax.set_title(f"{phase} ({_human(sel[0].phase_tokens)} tokens)")
        ax.set_xlabel("token share (%)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(100 * r.share for r in sel) * 1.35)
    fig.suptitle(f"Blend shares (red: more than {max_epochs:g} epochs)")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_report(rows: list[BlendRow], max_epochs: float, out_dir: Path, extra: list[str] = ()) -> list[str]:
    """report.md (with every warning), shares.csv and report.png; returns the warnings."""
    atomic_write_text(out_dir / "report.md", markdown(rows, max_epochs, extra))
    atomic_write_text(out_dir / "shares.csv", shares_csv(rows))
    plot(rows, max_epochs, out_dir / "report.png")
    return [*warnings_for(rows, max_epochs), *extra]
