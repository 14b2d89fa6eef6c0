"""Stage `eval`: test-split perplexity per dataset and greedy continuations of the exported HF model."""

from nano3.cli import stage_main
from nano3.eval.eval import run

if __name__ == "__main__":
    stage_main(run, __doc__)
