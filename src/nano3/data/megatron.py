"""Build each phase's blend with megatron-core's own BlendedMegatronDatasetBuilder, on the CPU.

This is the check that matters: the builder a GPU job runs opens every shard, builds document,
sample and shuffle indices and draws the blend, so a blend that builds here builds there. With
`blend.prebuild_cache`, the indices are written to `blend.cache_dir`, which training passes as
`dataset.path_to_cache`: index building moves off the GPU job's start-up. The cache is keyed on
exactly what the GPU job uses (paths, sizes, seed, sequence length, tokenizer), so the same
tokenizer configuration and sample counts are derived here as in the training stage.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from nano3.data.tokenizers import SPM_FILE, TokenizerInfo
from nano3.errors import UserError, brief
from nano3.megatron_compat import build_megatron_tokenizer, process_group_for_dataset_builds


def bridge_tokenizer_fields(tokenizer_dir: str, kind: str) -> dict:
    """The Megatron-Bridge TokenizerConfig fields for our tokenizer directory of this kind (TokenizerInfo.kind; also
    used by training)."""
    if kind == "sentencepiece":
        return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": str(Path(tokenizer_dir) / SPM_FILE)}
    return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tokenizer_dir)}


def megatron_tokenizer(tokenizer_dir: str, info: TokenizerInfo):
    """The tokenizer object Bridge builds for these fields (Bridge disables mcore's vocab padding)."""
    return build_megatron_tokenizer(bridge_tokenizer_fields(tokenizer_dir, info.kind))


def split_sizes(phase, eval_interval: int, eval_iters: int) -> list[int]:
    """Samples per split for one phase: train is what the phase reads (not the whole run's train_iters x GBS:
    phase 2 of 25T tokens reads 366M samples, not 6.1B); valid/test as Megatron-Bridge requests them
    (data/loaders.get_train_valid_test_num_samples)."""
    eval_total = (phase.train_iters // eval_interval + 1) * eval_iters if eval_interval else 0
    return [phase.samples, eval_total * phase.global_batch_size, eval_iters * phase.global_batch_size]


def build_phase(blend_file: Path, *, seq_length: int, seed: int, sizes: list[int], tokenizer,
                cache_dir: Path | None) -> list[int]:
    """Build the phase's train/valid/test datasets; return their lengths (samples)."""
    datasets = build_phase_datasets(blend_file, seq_length=seq_length, seed=seed, sizes=sizes, tokenizer=tokenizer,
                                    cache_dir=cache_dir)
    return [len(d) if d is not None else 0 for d in datasets]


def prefixes_and_weights(entries: list | None) -> tuple[list[str], list[float]] | None:
    """One split of a per_split_data_args_path file ([w, prefix, w, prefix, ...] or null) as megatron-core's
    (prefixes, weights) pair."""
    if not entries:
        return None
    return [entries[i + 1] for i in range(0, len(entries), 2)], [float(entries[i]) for i in range(0, len(entries), 2)]


def build_phase_datasets(blend_file: Path, *, seq_length: int, seed: int, sizes: list[int], tokenizer,
                         cache_dir: Path | None) -> list:
    """The phase's train/valid/test datasets (None for an empty split), as megatron-core builds them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    doc = json.loads(blend_file.read_text())

    blend_per_split = [prefixes_and_weights(doc[s]) for s in ("train", "valid", "test")]
    sizes = [n if blend is not None else 0 for n, blend in zip(sizes, blend_per_split)]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend_per_split=blend_per_split, tokenizer=tokenizer,
        path_to_cache=str(cache_dir) if cache_dir else None, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, mmap_bin_files=True,
        create_attention_mask=False,  # as training (train/mapping.py): a seq x seq mask per sample, never read
    )
    # megatron-core logs every index it builds at INFO; keep the stage's output to its summary.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), process_group_for_dataset_builds():
            datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except Exception as e:
        raise UserError(f"{blend_file}: megatron-core could not build this blend ({type(e).__name__}: "
                        f"{brief(e, 200)})") from None
    return datasets
