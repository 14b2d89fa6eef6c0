"""The model's vocabulary size, from params and the tokenizer the data was prepared with."""

from __future__ import annotations

from nano3.errors import UserError


def model_vocab(params) -> int:
    """The model's vocabulary: `model.vocab_size`, or the tokenizer's when that is null.

    A model vocabulary smaller than the tokenizer's would index past the embedding at the first
    batch (or silently clip ids): refuse it here.
    """
    from pathlib import Path

    from nano3.data.tokenizers import read_info

    info_file = Path(params.settings.tokenizer.dir) / "info.json"
    if info_file.exists():
        tokenizer = read_info(info_file.parent).vocab_size
    elif params.settings.tokenizer.name == "train":  # not trained yet, but its size is set
        tokenizer = params.settings.tokenizer.vocab_size
    else:
        tokenizer = None
    model = params.settings.model.vocab_size
    if model is not None and tokenizer is not None and model < tokenizer:
        raise UserError(f"{params.source}: model.vocab_size={model} is smaller than the tokenizer's {tokenizer} ids "
                        f"({info_file}); raise it or set it to null to use the tokenizer's")
    if model is None and tokenizer is None:
        raise UserError(f"{info_file}: no tokenizer yet and model.vocab_size is null; run the tokenizer stage "
                        f"or set model.vocab_size")
    return model if model is not None else tokenizer
