"""Stage `sample`: build the embedded corpus (stdlib code + docs) under sample.out_dir."""

from nano3.cli import stage_main
from nano3.data.sample import run

if __name__ == "__main__":
    stage_main(run, __doc__)
