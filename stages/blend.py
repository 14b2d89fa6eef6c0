"""Stage `blend`: per-phase Megatron-Bridge blend files, a report with a plot, and megatron-core's check."""

from nano3.blend.blend import run
from nano3.cli import stage_main

if __name__ == "__main__":
    stage_main(run, __doc__)
