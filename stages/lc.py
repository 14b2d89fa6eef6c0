"""Stage `lc`: long-context extension from the final pretrain checkpoint (its own blend, longer sequences).

    python stages/lc.py [--dry-run] [key=value ...] [bridge.<section>.<field>=value ...]

`key=value` overrides params.yaml; `bridge.model.recompute_granularity=full` sets a Megatron-Bridge field as it is
(a key params.yaml lacks is refused, never passed on). `--dry-run` prints the plan and exits.
"""

from nano3.cli import stage_main
from nano3.train.lc import add_options, run

if __name__ == "__main__":
    stage_main(run, __doc__, add_options)
