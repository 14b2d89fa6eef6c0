"""Stage `pretrain`: both curriculum phases (phase-1 blend to train.phase2_start, then phase 2) as one run.

    python stages/pretrain.py [--dry-run] [key=value ...] [bridge.<section>.<field>=value ...]

`key=value` overrides params.yaml; `bridge.model.recompute_granularity=full` sets a Megatron-Bridge field as it is
(a key params.yaml lacks is refused, never passed on). `--dry-run` prints the plan and exits.
"""

from nano3.cli import stage_main
from nano3.train.pretrain import add_options, run

if __name__ == "__main__":
    stage_main(run, __doc__, add_options)
