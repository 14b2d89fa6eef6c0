"""Stage `blend`: per-phase Megatron-Bridge blend files, a report with a plot, and megatron-core's check."""

from nano3.blend.build import build_blends
from nano3.cli import run_stage, stage_parser


def main(args, params) -> None:
    summary = build_blends(params)
    for phase, info in summary["phases"].items():
        shares = ", ".join(f"{n} {w:.0%}" for n, w in info["datasets"].items())
        print(f"blend {phase}: {info['tokens']:,} tokens from {shares}")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
