"""Stage `tokenizer`: the stage's entry, apart from the tokenizers themselves (data.tokenizers), so that training,
which reads tokenizers, does not depend on the readers of raw datasets."""

from __future__ import annotations

import dataclasses

from nano3.data.sources import DatasetSpec, Source, check_gated_access, hub_token, iter_texts
from nano3.data.tokenizers import build_tokenizer


def run(params, args) -> dict:
    """Stage `tokenizer`: train (tokenizer.name=train, on the raw text of tokenizer.train_datasets) or pin a
    Hugging Face tokenizer."""
    cfg = params.settings
    texts = None
    if cfg.tokenizer.name == "train":
        check_gated_access(params, cfg.tokenizer.train_datasets, hub_token())
        specs = [DatasetSpec.from_params(params, name) for name in cfg.tokenizer.train_datasets]
        texts = (t for spec in specs for t in iter_texts(Source(spec, cfg.prep.hf_mirror)))
    info = build_tokenizer(cfg.tokenizer, texts)
    print(f"tokenizer {info.kind} from {info.source}: vocab {info.vocab_size:,}, EOD {info.eod_token!r}={info.eod_id}, "
          f"fingerprint {info.fingerprint}")
    return dataclasses.asdict(info)
