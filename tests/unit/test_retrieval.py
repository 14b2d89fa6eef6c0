"""Synthetic pass-key retrieval: training documents from real text (stage `retrieval`) and eval's prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nano3.data.retrieval import ANSWER, NEEDLE, QUESTION, generate, passkey_prompt, plant, retrieval_stage
from nano3.errors import UserError
from tests.conftest import make_params


def test_the_key_is_planted_once_on_its_own_line_at_the_depth_and_asked_for_last():
    haystack = "\n".join(f"line {i} of real text" for i in range(100))
    doc = plant(haystack, "31415", 0.25)
    lines = doc.text.split("\n")
    needle = NEEDLE.format(key="31415")
    assert lines.count(needle) == 1 and lines.index(needle) == 25
    assert lines[-1] == QUESTION + ANSWER.format(key="31415") + "."
    assert doc.depth == pytest.approx(0.25, abs=0.02)
    assert doc.text.replace(needle + "\n", "").rsplit("\n", 1)[0] == haystack  # the haystack itself is untouched


def test_documents_are_real_text_of_the_asked_lengths_and_reproducible(sample_dir):
    from nano3.data.sources import DatasetSpec, Source, iter_texts

    source = Source(DatasetSpec("docs", str(sample_dir / "stdlib-docs")))
    texts = lambda: iter_texts(source)  # noqa: E731
    docs = list(generate(texts, 40, 2000, 6000, seed=7))
    assert docs == list(generate(texts, 40, 2000, 6000, seed=7))
    assert [d.key for d in docs] != [d.key for d in generate(texts, 40, 2000, 6000, seed=8)]
    overhead = len(NEEDLE) + len(QUESTION) + 2 * 5 + 4
    assert all(2000 // 2 <= len(d.text) - overhead <= 6000 + 1 for d in docs)
    depths = [d.depth for d in docs]
    assert min(depths) < 0.2 and max(depths) > 0.8  # spread over the haystack
    corpus = "\n".join(iter_texts(source))
    for d in docs[:5]:  # every haystack line is a line of the corpus
        hay = [line for line in d.text.split("\n")[:-1] if line and line != NEEDLE.format(key=d.key)]
        assert all(line in corpus for line in hay)


def test_the_stage_takes_haystacks_from_the_train_split_only(tmp_path, sample_dir, spm_dir):
    """Eval's haystacks come from the test split: no generated document may contain a test document."""
    from nano3.data.prep import split_of
    from nano3.data.sources import DatasetSpec, Source, iter_texts

    datasets = {"docs": {"source": str(sample_dir / "stdlib-docs"), "valid_fraction": 0.1, "test_fraction": 0.1}}
    params = make_params(tmp_path, spm_dir, datasets)
    params["retrieval"] = {"out_dir": str(tmp_path / "retrieval"), "haystack_dataset": "docs", "documents": 60,
                           "min_chars": 2000, "max_chars": 8000, "shards": 3, "seed": 1}
    summary = retrieval_stage(params, log=lambda *_: None)
    rows = [json.loads(line) for f in sorted((tmp_path / "retrieval").glob("*.jsonl")) for line in open(f)]
    assert summary["documents"] == len(rows) == 60 and len(list((tmp_path / "retrieval").glob("*.jsonl"))) == 3
    assert all(r["text"].endswith(ANSWER.format(key=r["key"]) + ".") for r in rows)
    held_out = [t for t in iter_texts(Source(DatasetSpec("docs", str(sample_dir / "stdlib-docs"))))
                if split_of(t, 0.1, 0.1)[0] != "train" and len(t) > 300]
    assert held_out
    text = "\n".join(r["text"] for r in rows)
    assert not [t for t in held_out if t[:300] in text]


def test_a_stage_without_haystack_text_fails_in_one_line(tmp_path, spm_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "a short one"}) + "\n")
    params = make_params(tmp_path, spm_dir, {"docs": {"source": str(empty), "valid_fraction": 0.0,
                                                      "test_fraction": 0.999}})
    params["retrieval"] = {"out_dir": str(tmp_path / "retrieval"), "haystack_dataset": "docs", "documents": 2}
    with pytest.raises(UserError, match="retrieval.haystack_dataset"):
        retrieval_stage(params, log=lambda *_: None)
    assert not (tmp_path / "retrieval").exists()


def encoder(spm_dir):
    from nano3.data.tokenizers import Encoder

    enc = Encoder(spm_dir)
    return lambda text: [int(t) for t in enc.encode_batch([text])[0]]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_have_the_exact_length_and_end_with_the_answer(spm_dir, depth):
    encode = encoder(spm_dir)
    haystack = list(range(1000, 3000))
    ids, answer = passkey_prompt(haystack, encode, 512, depth, "27182")
    assert len(ids) == 512 and ids[-len(answer):] == answer
    needle = encode("\n" + NEEDLE.format(key="27182") + "\n")
    at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    room = 512 - len(needle) - len(answer) - len(encode("\n" + QUESTION))
    assert at == round(depth * room)
    assert [t for t in ids[:at]] == haystack[:at]  # the haystack, in order, around the needle


def test_a_haystack_too_short_for_the_length_is_one_line(spm_dir):
    with pytest.raises(UserError, match="eval.long_context"):
        passkey_prompt(list(range(100)), encoder(spm_dir), 512, 0.5, "12345")


class Oracle:
    """A 'model' whose next-token argmax is the prompt's true next token: retrieval must score it 100%, and a
    scorer off by one position would score it 0%. Its decoder's 'hidden states' are those logits and its output
    layer is the identity (eval makes logits from the hidden states a chunk at a time)."""

    def __init__(self, vocab: int, wrong: bool = False):
        import torch

        self.vocab, self.wrong, self.full = vocab, wrong, None
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def get_input_embeddings(self):
        return self

    def lm_head(self, hidden):
        return hidden

    def model(self, input_ids):
        import torch

        ids = input_ids[0].tolist()
        nxt = [self.full[i + 1] for i in range(len(ids))]
        if self.wrong:
            nxt = [(t + 1) % self.vocab for t in nxt]
        logits = torch.full((1, len(ids), self.vocab), -10.0)
        logits[0, torch.arange(len(ids)), torch.tensor(nxt)] = 10.0
        return (logits,)


def test_retrieval_is_scored_on_the_answer_tokens(spm_dir, monkeypatch):
    import nano3.eval.long_context as lc

    encode = encoder(spm_dir)
    haystack = np.arange(100, 5000)
    real = lc.passkey_prompt
    for wrong, expected in ((False, 1.0), (True, 0.0)):
        oracle = Oracle(8192, wrong)

        def remember(*args, **kwargs):
            ids, answer = real(*args, **kwargs)
            oracle.full = ids
            return ids, answer

        monkeypatch.setattr(lc, "passkey_prompt", remember)
        result = lc.retrieval_accuracy(oracle, haystack, encode, [256, 512], prompts=5, seed=3, chunk_tokens=100)
        assert {k: v["accuracy"] for k, v in result.items()} == {"256": expected, "512": expected}
        assert [d["depth"] for d in result["256"]["by_depth"]] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_loss_by_position_averages_documents_into_buckets():
    """A real (random) NemotronH: the buckets cover the window and average the per-position losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from nano3.eval.long_context import loss_by_position
    from nano3.model.hf import nemotron_h_config, use_cpu_mamba_chunks
    from nano3.model.presets import PRESETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(nemotron_h_config(PRESETS["tiny"], vocab_size=512, eod_id=2,
                                                               max_positions=256)).eval()
    use_cpu_mamba_chunks(model)
    docs = [np.random.default_rng(i).integers(3, 512, size=200) for i in range(3)]
    curve = loss_by_position(model, docs, 128, 4, chunk_tokens=4096)
    assert [b["loss"] for b in loss_by_position(model, docs, 128, 4, chunk_tokens=50)] == pytest.approx(
        [b["loss"] for b in curve], rel=1e-6)  # in chunks of 50 positions: the same curve
    assert [(b["from"], b["to"]) for b in curve] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    import torch.nn.functional as F

    per = []
    for d in docs:
        ids = torch.as_tensor(d[:129]).unsqueeze(0)
        with torch.no_grad():
            per.append(F.cross_entropy(model(input_ids=ids[:, :-1]).logits[0].float(), ids[0, 1:], reduction="none"))
    assert curve[1]["loss"] == pytest.approx(torch.stack(per).mean(0)[32:64].mean().item(), rel=1e-5)
    assert all(abs(b["loss"] - np.log(512)) < 1.0 for b in curve)  # random weights: near uniform
