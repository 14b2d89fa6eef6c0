"""The tokenizer stage: deterministic SentencePiece training, and HF tokenizers from a directory or the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nano3.data.tokenizer import Encoder, read_info, save_huggingface, train_sentencepiece
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


def hf_tokenizer_dir(dest: Path, texts: list[str]) -> Path:
    """A fast HF tokenizer saved exactly as a hub repo stores one (tokenizer.json + config files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<unk>"]))
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
        "import sys; from nano3.data.tokenizer import save_huggingface; from nano3.errors import UserError\n"
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
