"""Stage `tokenizer`: train (tokenizer.name=train) or pin a Hugging Face tokenizer into tokenizer.dir."""

from nano3.cli import stage_main
from nano3.data.tokenizer import run

if __name__ == "__main__":
    stage_main(run, __doc__)
