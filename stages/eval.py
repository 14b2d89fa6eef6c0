"""Stage `eval`: test-split perplexity per dataset and greedy continuations of the exported HF model."""

from nano3.cli import run_stage, stage_parser
from nano3.eval.stage import eval_stage


def main(args, params) -> None:
    eval_stage(params)
    print(f"eval: report {params.get_key('eval.out_dir')}/report.md, metrics {params.get_key('eval.out_dir')}/metrics.json")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
