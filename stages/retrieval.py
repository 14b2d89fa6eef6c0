"""Stage `retrieval`: synthetic pass-key documents from a real corpus's text, for the lc blend."""

from nano3.cli import stage_main
from nano3.data.retrieval import run

if __name__ == "__main__":
    stage_main(run, __doc__)
