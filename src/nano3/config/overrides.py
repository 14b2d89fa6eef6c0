"""The command line's `key=value` items: params.yaml keys, or Megatron-Bridge fields written `bridge.<section>.<field>`.

A Bridge field is always explicit, so a params.yaml key never silently shadows one (and a typo in a params key is
refused with the nearest valid key instead of travelling to Bridge).
"""

from __future__ import annotations

import difflib

from nano3.config.schema import field_docs
from nano3.config.sections import Settings
from nano3.errors import UserError

BRIDGE_PREFIX = "bridge."
# Bridge ConfigContainer sections a command-line override may address.
BRIDGE_SECTIONS = ("model", "train", "validation", "optimizer", "scheduler", "dataset", "checkpoint", "logger",
                   "ddp", "rng", "mixed_precision", "comm_overlap", "dist", "profiling", "tokenizer")

# Bridge fields the stage itself must own: setting them behind its back breaks resume or the curriculum.
STAGE_OWNED = {
    "checkpoint.save": "checkpoints go to train.checkpoint_dir/<stage>/<run digest>; set train.checkpoint_dir",
    "checkpoint.load": "the stage resumes from its own run directory; set train.checkpoint_dir",
    "train.train_iters": "set by the token budget; set train.tokens (or lc.tokens)",
    "dataset.per_split_data_args_path": "the blend stage writes the phase blends; change blend.phases",
}


def split_cli_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(params.yaml overrides, Bridge overrides as `<section>.<field>=value`). `train.train_iters` is refused:
    nano3 sizes a run in tokens (train.tokens); an unknown params key is refused by the typed sections on load."""
    ours, bridge = [], []
    for text in items:
        key, _, value = text.partition("=")
        if key.startswith(BRIDGE_PREFIX):
            field = key[len(BRIDGE_PREFIX):]
            if "." not in field or field.split(".")[0] not in BRIDGE_SECTIONS:
                raise UserError(f"override '{text}': Megatron-Bridge fields are bridge.<section>.<field> with a "
                                f"section among {', '.join(BRIDGE_SECTIONS)}")
            if field in STAGE_OWNED:
                raise UserError(f"override '{text}': {STAGE_OWNED[field]}")
            bridge.append(f"{field}={value}")
        elif key in ("train.train_iters", "lc.train_iters"):
            raise UserError(f"override '{text}': nano3 sizes a run in tokens; set {key.split('.')[0]}.tokens "
                            f"(iterations x global_batch_size x seq_length)")
        else:
            ours.append(text)
    return ours, bridge


def unknown_key_hint(key: str) -> str:
    """What to say about a command-line key params.yaml lacks: the nearest key, and how a Bridge field is written."""
    close = difflib.get_close_matches(key, [row[0] for row in field_docs(Settings)], n=1, cutoff=0.6)
    hints = [f"did you mean '{close[0]}'?"] if close else []
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in BRIDGE_SECTIONS:
        hints.append(f"a Megatron-Bridge field is written bridge.{key}")
    return " ".join(hints) or "see docs/parameters.md"
