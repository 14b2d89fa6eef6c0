"""Stage `export`: the final pretrain or lc checkpoint (export.source) to a Hugging Face NemotronH directory."""

from nano3.cli import stage_main
from nano3.export.export import run

if __name__ == "__main__":
    stage_main(run, __doc__)
