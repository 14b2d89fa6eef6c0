"""Blend definition (params `blend.phases`) -> one Megatron-Bridge `per_split_data_args_path` file per phase.

Weights are token shares: Megatron normalises blend weights into sampling probabilities over
sequences, so a dataset weighted 0.3 supplies ~30% of the phase's tokens whatever its size. A
dataset's share is spread over its train shards in proportion to their tokens. Paths are written
relative to the repository root, where training runs, so blend files are identical on every checkout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nano3.data.shards import check_shards, manifest_path, shard_prefix
from nano3.errors import UserError
from nano3.files import read_json

PHASES = ("phase1", "phase2", "lc")


@dataclass(frozen=True)
class BlendRow:
    phase: str
    dataset: str
    share: float  # normalised weight in the phase
    dataset_tokens: int  # train tokens the dataset has
    phase_tokens: int  # the phase's token budget
    epochs: float  # how many times the phase reads the dataset

    @property
    def drawn_tokens(self) -> float:
        return self.share * self.phase_tokens


def phase_weights(params, phase: str) -> dict[str, float]:
    """The phase's weights, normalised; names the key at fault when they do not parse."""
    key = f"blend.phases.{phase}"
    raw = params.settings.blend.phases.get(phase)
    if raw is None:
        raise UserError(f"{params.source}: missing key '{key}'; add it (see docs/parameters.md)")
    weights = {}
    for name, value in raw.items():
        w = float(value)  # a number: the typed sections checked it
        if not math.isfinite(w) or w < 0:
            raise UserError(f"{params.source}: '{key}.{name}' = {value!r} must be a finite weight >= 0")
        if w > 0:
            weights[str(name)] = w
    total = sum(weights.values())
    if total <= 0:
        raise UserError(f"{params.source}: '{key}' has no positive weight; give at least one dataset a weight > 0")
    return {name: w / total for name, w in weights.items()}


def load_manifests(params, names) -> dict[str, dict]:
    """Manifests of the named datasets; an unprepared one, or a tokenizer mismatch, is an error."""
    manifests = {}
    for name in sorted(names):
        if name not in params.settings.datasets:
            raise UserError(f"{params.source}: the blend names '{name}', which is not in `datasets`; add it or drop it")
        path = manifest_path(params.settings.prep, name)
        if not path.exists():
            raise UserError(f"{path}: dataset '{name}' is not prepared; run `make prep` (or dvc repro prep@{name})")
        manifests[name] = read_json(path, f"manifest of dataset '{name}'")
        if "shards_dir" not in manifests[name]:
            raise UserError(f"{path}: prepared before shards moved to prep.shards_dir; rerun `dvc repro prep@{name}`")
        check_shards(manifests[name])
    fingerprints = {m["tokenizer"]["fingerprint"] for m in manifests.values()}
    if len(fingerprints) > 1:
        detail = ", ".join(f"{n}={m['tokenizer']['fingerprint']}" for n, m in manifests.items())
        raise UserError(f"datasets were tokenized with different tokenizers ({detail}); rerun prep for the stale ones")
    return manifests


def split_entries(manifest: dict, split: str, weight: float) -> list[str]:
    """`weight, prefix` pairs for one dataset's shards of a split, weighted by their tokens."""
    info = manifest["splits"][split]
    out = []
    for shard in info["shards"]:
        out += [repr(weight * shard["tokens"] / info["tokens"]), str(shard_prefix(manifest, shard))]
    return out


def per_split_blend(manifests: dict[str, dict], weights: dict[str, float]) -> dict:
    """The per_split_data_args_path document: train/valid/test, each a flat weight/prefix list or null."""
    blend = {}
    for split in ("train", "valid", "test"):
        present = {n: w for n, w in weights.items() if manifests[n]["splits"][split]["tokens"] > 0}
        if split == "train" and set(present) != set(weights):
            empty = sorted(set(weights) - set(present))
            raise UserError(f"datasets {empty} have no training tokens; lower their valid/test fractions or drop them")
        total = sum(present.values())
        entries = [e for n, w in sorted(present.items()) for e in split_entries(manifests[n], split, w / total)]
        blend[split] = entries or None
    return blend


def held_out_gaps(manifests: dict[str, dict], weights: dict[str, float], phase: str) -> list[str]:
    """A dataset whose hash split left no validation (or test) document drops out of that split's blend
    silently: say so, with the knob that fixes it."""
    out = []
    for name in sorted(weights):
        total = sum(manifests[name]["splits"][s]["documents"] for s in ("train", "valid", "test"))
        for split in ("valid", "test"):
            if manifests[name]["splits"][split]["tokens"] == 0:
                out.append(f"{phase}: {name} has no {split} documents (its hash split left 0 of {total:,}), so "
                           f"{split} loss leaves it out; raise datasets.{name}.{split}_fraction")
    return out


def blend_rows(phase: str, manifests: dict[str, dict], weights: dict[str, float], phase_tokens: int) -> list[BlendRow]:
    rows = []
    for name, share in sorted(weights.items()):
        tokens = manifests[name]["splits"]["train"]["tokens"]
        rows.append(BlendRow(phase, name, share, tokens, phase_tokens, share * phase_tokens / tokens))
    return rows
