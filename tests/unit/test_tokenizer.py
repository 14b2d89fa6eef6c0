"""The tokenizer stage: deterministic SentencePiece training, and HF tokenizers from a directory or the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nano3.data.tokenizers import Encoder, read_info, save_huggingface, train_sentencepiece
from tests.unit.test_sources import docs_from


def test_sentencepiece_is_deterministic_and_round_trips(tmp_path, sample_dir, spm_dir):
    # The fixture trained on stdlib-code then stdlib-docs; the same stream gives the same model bytes.
    stream = docs_from(sample_dir, "stdlib-code") + docs_from(sample_dir, "stdlib-docs")
    again = train_sentencepiece(iter(stream), tmp_path / "again", vocab_size=4096, max_sentences=100_000, seed=7)
    first = read_info(spm_dir)
    assert first.kind == "sentencepiece" and first.vocab_size == 4096 and first.eod_token == "</s>"
    assert again.fingerprint == first.fingerprint
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (spm_dir / "tokenizer.model").read_bytes()
    other_seed = train_sentencepiece(iter(stream), tmp_path / "seed8", vocab_size=4096, max_sentences=100_000, seed=8)
    assert other_seed.fingerprint != first.fingerprint  # the sampled lines really depend on the seed
    import sentencepiece as spm

    docs = docs_from(sample_dir, "stdlib-docs") + docs_from(sample_dir, "stdlib-code", 50)
    enc = Encoder(spm_dir)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    for text, ids in zip(docs, enc.encode_batch(docs), strict=True):
        assert sp.decode(ids) == text  # code indentation, newlines and tabs survive exactly
    arrays = enc.encode_documents(docs[:3])
    assert all(a[-1] == first.eod_id and a.dtype.name == "uint16" for a in arrays)


def hf_tokenizer_dir(dest: Path, texts: list[str], vocab_size: int = 600, all_bytes: bool = False) -> Path:
    """A fast HF tokenizer saved exactly as a hub repo stores one (tokenizer.json + config files);
    `all_bytes` gives it the 256 byte tokens production byte-level BPEs (Nemotron's) have."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                                       initial_alphabet=alphabet))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_pretrained(dest)
    return dest


def test_huggingface_tokenizer_from_a_local_directory(tmp_path, sample_dir):
    docs = docs_from(sample_dir, "stdlib-docs", 200)
    src = hf_tokenizer_dir(tmp_path / "src", docs)
    info = save_huggingface(str(src), tmp_path / "out")
    assert info.kind == "huggingface" and info.eod_token == "</s>" and info.eod_id == 1
    assert (tmp_path / "out" / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(src)
    enc = Encoder(tmp_path / "out")
    assert enc.encode_batch(docs[:20]) == [ref(t, add_special_tokens=False)["input_ids"] for t in docs[:20]]


def test_huggingface_tokenizer_by_hub_name_from_the_local_cache(tmp_path, sample_dir):
    """A hub name resolves through the HF cache layout (models--org--name/snapshots/<rev>), offline.

    Run in a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import.
    """
    repo = tmp_path / "hf" / "hub" / "models--nvidia--Fake-Nano-Tokenizer"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hf_tokenizer_dir(repo / "snapshots" / rev, docs_from(sample_dir, "stdlib-docs", 100))
    (snapshot / "config.json").write_text('{"model_type": "nemotron_h"}')  # a model repo has one
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    script = (
        "import sys; from nano3.data.tokenizers import save_huggingface; from nano3.errors import UserError\n"
        "info = save_huggingface('nvidia/Fake-Nano-Tokenizer', sys.argv[1])\n"
        "print(info.source, info.vocab_size, info.eod_token)\n"
        "try:\n    save_huggingface('nvidia/Not-In-Cache', sys.argv[2])\n"
        "except UserError as e:\n    print('ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), str(tmp_path / "out2")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "nvidia/Fake-Nano-Tokenizer 600 </s>"
    assert lines[1].startswith("ERROR tokenizer.name=nvidia/Not-In-Cache: could not load") and len(lines) == 2
    assert (tmp_path / "out" / "tokenizer.json").exists() and not (tmp_path / "out2").exists()


# ---- issue 14: the fastest encoder that gives the tokenizer's own ids ------------------------------------------

def test_gigatoken_gives_tokenizers_ids_on_the_whole_sample_corpus(tmp_path, sample_dir):
    """A byte-level BPE trained with `tokenizers` on real text (the production tokenizer's kind): gigatoken's ids
    equal tokenizers' on every document of both sample datasets, so `auto` takes it."""
    from nano3.data.tokenizers import choose_encoder

    docs = docs_from(sample_dir, "stdlib-code") + docs_from(sample_dir, "stdlib-docs")
    src = hf_tokenizer_dir(tmp_path / "src", docs[:400], vocab_size=4096, all_bytes=True)
    save_huggingface(str(src), tmp_path / "tok")
    reference, fast = Encoder(tmp_path / "tok"), Encoder(tmp_path / "tok", "gigatoken", threads=2)
    assert fast.encode_batch(docs) == reference.encode_batch(docs)
    assert choose_encoder(tmp_path / "tok", "auto", lambda: docs[:50])[0] == "gigatoken"
    assert choose_encoder(tmp_path / "tok", "reference", lambda: docs[:50])[0] == "reference"
    # a BPE without all 256 byte tokens is beyond gigatoken: auto falls back, insisting is one line
    import pytest

    from nano3.errors import UserError

    save_huggingface(str(hf_tokenizer_dir(tmp_path / "small", docs[:100])), tmp_path / "small_tok")
    name, why = choose_encoder(tmp_path / "small_tok", "auto", lambda: docs[:50])
    assert name == "reference" and why.startswith("tokenizers (gigatoken unusable here:")
    with pytest.raises(UserError, match="gigatoken cannot load this tokenizer"):
        choose_encoder(tmp_path / "small_tok", "gigatoken", lambda: docs[:50])


def test_sentencepiece_through_gigatoken_gives_sentencepieces_ids_and_a_differing_encoder_is_refused(spm_dir,
                                                                                                    sample_dir,
                                                                                                    monkeypatch):
    """gigatoken reads a SentencePiece model's control pieces (`<s>`, `</s>`, `<unk>`) where a document spells
    them; sentencepiece never does. Such documents are routed to sentencepiece, and the whole sample corpus then
    gets sentencepiece's ids: `auto` takes gigatoken. Without the routing the ids differ, and the encoder is
    refused (auto falls back; insisting on it is one line)."""
    import pytest

    from nano3.data import tokenizers as tok_module
    from nano3.data.tokenizers import choose_encoder, first_difference
    from nano3.errors import UserError

    docs = docs_from(sample_dir, "stdlib-code") + docs_from(sample_dir, "stdlib-docs")
    docs.append("def parse(s):\n    return s.startswith('<s>') and '</s>' in s  # markup <unk>\n")
    reference, fast = Encoder(spm_dir), Encoder(spm_dir, "gigatoken", threads=2)
    assert fast.encode_batch(docs) == reference.encode_batch(docs)
    raw = fast._gt.encode_batch_list([docs[-1]], parallel=False)
    assert raw != reference.encode_batch([docs[-1]])  # what the routing is for
    assert choose_encoder(spm_dir, "auto", lambda: docs)[0] == "gigatoken"

    init = tok_module.Encoder.__init__

    def unrouted(self, *args, **kwargs):  # gigatoken without the routing of control-piece documents
        init(self, *args, **kwargs)
        self._literals = ()

    monkeypatch.setattr(tok_module.Encoder, "__init__", unrouted)
    where = first_difference(reference.encode_batch(docs), Encoder(spm_dir, "gigatoken").encode_batch(docs))
    assert where is not None
    name, why = choose_encoder(spm_dir, "auto", lambda: docs)
    assert name == "reference" and why == f"sentencepiece (gigatoken differs on probe document {where})"
    with pytest.raises(UserError, match=f"gives other ids than sentencepiece on probe document {where}"):
        choose_encoder(spm_dir, "gigatoken", lambda: docs)
    with pytest.raises(UserError, match="prep.encoder='fast' must be one of auto, reference, gigatoken"):
        choose_encoder(spm_dir, "fast", lambda: docs)

