"""Synthetic pass-key retrieval: a key planted at a random depth of real text, asked for at the end.

As retrieval datasets for long-context training and the needle-in-a-haystack tests are built: the haystack is
a real corpus's text (here the train split of `retrieval.haystack_dataset`, so evaluation's haystacks, from its
test split, are never trained on), the needle a random five-digit key, the question and answer the last line.
Stage `retrieval` writes the training documents (JSONL shards with `text`, `key` and `depth`, prepared like any
dataset and weighted in the `lc` blend); the eval stage builds its prompts at exact token lengths with `passkey_prompt`, from the same templates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nano3.errors import UserError
from nano3.files import atomic_dir

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class RetrievalDoc:
    text: str
    key: str
    depth: float  # characters before the needle / haystack characters


def new_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def plant(haystack: str, key: str, depth: float) -> RetrievalDoc:
    """The haystack with the needle on its own line at the line boundary nearest `depth`, then the question and
    the answer on the last line."""
    lines = haystack.split("\n")
    cut = round(depth * len(lines))
    before = "\n".join(lines[:cut])
    text = "\n".join([*lines[:cut], NEEDLE.format(key=key), *lines[cut:]])
    text += "\n" + QUESTION + ANSWER.format(key=key) + "."
    return RetrievalDoc(text, key, len(before) / max(len(haystack), 1))


def haystacks(texts: Callable[[], Iterable[str]], rng: random.Random, min_chars: int, max_chars: int) -> Iterator[str]:
    """Endless haystacks of min..max characters: consecutive documents joined by a blank line, cut at a line end;
    the texts start over when they run out."""
    buffer = ""
    while True:
        got_any = False
        for text in texts():
            got_any = True
            buffer = f"{buffer}\n\n{text}" if buffer else text
            while len(buffer) >= max_chars:
                target = rng.randint(min_chars, max_chars)
                end = buffer.rfind("\n", 0, target)
                end = end if end > min_chars // 2 else target
                yield buffer[:end]
                buffer = buffer[end:].lstrip("\n")
        if not got_any:
            raise UserError("retrieval.haystack_dataset: its train split has no documents to take haystacks from")


def generate(texts: Callable[[], Iterable[str]], documents: int, min_chars: int, max_chars: int,
             seed: int) -> Iterator[RetrievalDoc]:
    rng = random.Random(seed)
    stacks = haystacks(texts, rng, min_chars, max_chars)
    for _ in range(documents):
        yield plant(next(stacks), new_key(rng), rng.random())


def passkey_prompt(haystack: list[int], encode: Callable[[str], list[int]], length: int, depth: float,
                   key: str) -> tuple[list[int], list[int]]:
    """`length` token ids: haystack tokens with the needle at `depth`, then the question and the answer; and the
    answer's ids (the last ones of the prompt), which a model that retrieves predicts from what precedes them."""
    needle = encode("\n" + NEEDLE.format(key=key) + "\n")
    question = encode("\n" + QUESTION)
    full = encode("\n" + QUESTION + ANSWER.format(key=key))
    answer = full[len(question):] if full[:len(question)] == question else encode(ANSWER.format(key=key))
    room = length - len(needle) - len(question) - len(answer)
    if room < 1 or len(haystack) < room:
        raise UserError(f"eval.long_context: a prompt of {length} tokens needs {max(room, 1)} haystack tokens; "
                        f"{len(haystack)} available (shorten eval.long_context.lengths or add test documents)")
    hay = list(haystack[:room])
    at = round(depth * room)
    return hay[:at] + needle + hay[at:] + question + answer, answer


def retrieval_stage(params, log=print) -> dict:
    """Stage `retrieval`: `retrieval.documents` documents as JSONL shards under `retrieval.out_dir`."""
    from tqdm import tqdm

    from nano3.data.prep import split_of
    from nano3.data.sources import DatasetSpec, Source, iter_texts

    cfg = params.settings.retrieval
    spec = DatasetSpec.from_params(params, cfg.haystack_dataset)
    source = Source(spec, params.settings.prep.hf_mirror)

    def train_texts() -> Iterator[str]:  # the haystack dataset's train split, as prep assigns it
        return (t for t in iter_texts(source) if split_of(t, spec.valid_fraction, spec.test_fraction)[0] == "train")

    docs = generate(train_texts, cfg.documents, cfg.min_chars, cfg.max_chars, cfg.seed)
    out = Path(cfg.out_dir)
    per_shard, characters = -(-cfg.documents // cfg.shards), 0
    with atomic_dir(out) as tmp, tqdm(total=cfg.documents, desc="retrieval", unit="doc", disable=None) as bar:
        for shard in range(cfg.shards):  # streamed: a production run writes gigabytes
            with open(tmp / f"part-{shard:05d}.jsonl", "w") as f:
                for doc in islice(docs, per_shard):
                    f.write(json.dumps({"text": doc.text, "key": doc.key, "depth": round(doc.depth, 4)}) + "\n")
                    characters += len(doc.text)
                    bar.update()
    summary = {"documents": cfg.documents, "characters": characters, "haystack_dataset": cfg.haystack_dataset,
               "seed": cfg.seed, "shards": cfg.shards}
    log(f"retrieval: {cfg.documents} documents ({summary['characters']:,} characters) from {cfg.haystack_dataset}'s "
        f"train split -> {out}")
    return summary


def run(params, args) -> dict:
    """Stage `retrieval`."""
    return retrieval_stage(params)
