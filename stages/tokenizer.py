"""Stage `tokenizer`: train (tokenizer.name=train) or pin a Hugging Face tokenizer into tokenizer.dir."""

from nano3.cli import run_stage, stage_parser
from nano3.data.sources import DatasetSpec, Source, iter_texts
from nano3.data.tokenizer import build_tokenizer


def main(args, params) -> None:
    texts = None
    if params.get_key("tokenizer.name") == "train":
        names = params.get_key("tokenizer.train_datasets", kind=list)
        hf_mirror = params.get_key("prep.hf_mirror", None)
        texts = (t for name in names for t in iter_texts(Source(DatasetSpec.from_params(params, name), hf_mirror)))
    info = build_tokenizer(params, texts)
    print(f"tokenizer {info.kind} from {info.source}: vocab {info.vocab_size:,}, EOD {info.eod_token!r}={info.eod_id}, "
          f"fingerprint {info.fingerprint}")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
