"""Stage `lc`: long-context extension from the final pretrain checkpoint (its own blend, longer sequences).

    python stages/lc.py [--dry-run] [key=value ...]

`key=value` overrides params.yaml; a Bridge field not in params.yaml (`model.recompute_granularity=full`,
`train.manual_gc=false`) is passed to Megatron-Bridge as it is. `--dry-run` prints the plan and exits.
"""

from nano3.train.run import training_stage_main

if __name__ == "__main__":
    training_stage_main("lc", __doc__)
