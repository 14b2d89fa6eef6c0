"""Stage `lc`: long-context extension from the final pretrain checkpoint (its own blend, longer sequences).

    python stages/lc.py [--dry-run] [key=value ...]

`key=value` overrides params.yaml; a Bridge field not in params.yaml (`model.recompute_granularity=full`,
`train.manual_gc=false`) is passed to Megatron-Bridge as it is. `--dry-run` prints the plan and exits.
"""


from nano3.cli import run_stage, stage_parser
from nano3.config import load_params
from nano3.train.mapping import split_cli_overrides
from nano3.train.run import run_training_stage


def main(args, _params) -> None:
    ours, bridge = split_cli_overrides(load_params(args.params), args.overrides)
    run_training_stage("lc", args.params, ours, bridge, dry_run=args.dry_run)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the plan (no GPU needed) and exit")
    run_stage(main, parser, load=False)
