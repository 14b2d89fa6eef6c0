"""Stage `prep`: tokenize one dataset (a key of `datasets` in params.yaml) into Megatron .bin/.idx shards."""

from nano3.cli import stage_main
from nano3.data.prep import add_options, run

if __name__ == "__main__":
    stage_main(run, __doc__, add_options)
