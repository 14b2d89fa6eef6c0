"""Held-out token streams for evaluation, read from the prepared bin/idx shards with megatron-core's reader."""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np

from nano3.data.shards import check_shards, manifest_path, shard_prefix
from nano3.errors import UserError
from nano3.files import read_json


def blend_datasets(params) -> list[str]:
    """Every dataset any blend phase draws from, in first-seen order."""
    names: list[str] = []
    for weights in (params.settings.blend.phases or {}).values():
        names += [n for n in weights if n not in names]
    return names


def split_documents_of(params, dataset: str, split: str) -> Iterator[np.ndarray]:
    """Every document of a dataset's prepared split (tokens, ending in EOD), in order."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = read_json(manifest_path(params.settings.prep, dataset), f"prepared dataset '{dataset}' (run make prep)")
    check_shards(manifest, [split])
    for shard in manifest.get("splits", {}).get(split, {}).get("shards", []):
        docs = IndexedDataset(str(shard_prefix(manifest, shard)))
        for i in range(len(docs)):
            yield np.asarray(docs[i], dtype=np.int64)


def split_stream(params, dataset: str, split: str, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` tokens of a dataset's split, documents (each ending in EOD) in order."""
    pieces, have = [], 0
    for doc in split_documents_of(params, dataset, split):
        pieces.append(doc[: max_tokens - have])
        have += len(pieces[-1])
        if have >= max_tokens:
            return np.concatenate(pieces)
    if not pieces:
        raise UserError(f"{manifest_path(params.settings.prep, dataset)}: dataset '{dataset}' has no {split} documents; raise "
                        f"datasets.{dataset}.{split}_fraction (or prep.{split}_fraction) and rerun prep")
    return np.concatenate(pieces)


def windows(stream: np.ndarray, seq_length: int) -> np.ndarray:
    """Non-overlapping windows of seq_length + 1 tokens (inputs and their next tokens); a short stream is one window."""
    n = max(1, (len(stream) - 1) // seq_length)
    length = min(seq_length, len(stream) - 1)
    return np.stack([stream[i * length: i * length + length + 1] for i in range(n)])


def split_documents(params, dataset: str, split: str, min_tokens: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` documents of a dataset's split with at least `min_tokens` tokens, in order."""
    return list(islice((d for d in split_documents_of(params, dataset, split) if len(d) >= min_tokens), limit))
