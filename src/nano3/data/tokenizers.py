"""The tokenizers: the tokenizer stage's output (data.tokenizer runs it), and the one encoder interface data
preparation uses.

`params.tokenizer.name` is either `train` (a SentencePiece BPE model trained on the sample corpus,
the embedded default) or a Hugging Face tokenizer: a hub name, resolved through the local HF cache
and the hub, or a local directory. Either way the stage writes `data/tokenizer/` with the tokenizer
files and `info.json` (kind, vocab size, EOD id, fingerprint), so every later stage is offline and
pinned to exactly the files that were fingerprinted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from nano3.config.sections import TokenizerConfig
from nano3.errors import UserError, brief
from nano3.files import atomic_dir, atomic_write_json, read_json

INFO_FILE = "info.json"
SPM_FILE = "tokenizer.model"


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "sentencepiece" or "huggingface"
    source: str
    vocab_size: int  # every id the tokenizer can emit is < vocab_size
    eod_id: int
    eod_token: str
    fingerprint: str

    @property
    def token_dtype(self) -> type:
        """Megatron's rule: uint16 below 65,500 ids, else int32."""
        from nano3.data.binidx import optimal_dtype

        return optimal_dtype(self.vocab_size)


def fingerprint_files(directory: Path, names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256((directory / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def read_info(directory: str | Path) -> TokenizerInfo:
    fields = read_json(Path(directory) / INFO_FILE, "tokenizer info (run the tokenizer stage)")
    return TokenizerInfo(**{k: fields[k] for k in TokenizerInfo.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Building the tokenizer directory


def train_sentencepiece(texts: Iterator[str], out_dir: str | Path, vocab_size: int, max_sentences: int, seed: int):
    """Train a byte-fallback BPE model that round-trips code and prose exactly (no normalisation)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    # SentencePiece's own sentence sampling differs between processes even with a fixed seed, so
    # sample here: a seeded reservoir of at most max_sentences lines, identical on every run.
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            elif (j := rng.randrange(seen)) < max_sentences:
                sample[j] = line

    model = io.BytesIO()  # a model_prefix would be recorded in the model: write the bytes ourselves
    with atomic_dir(out_dir) as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            add_dummy_prefix=False,  # no invented leading space: HF's converted tokenizer then encodes the same
            user_defined_symbols=["\n", "\t"],
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=16384,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1,  # deterministic: the same corpus gives the same model
            minloglevel=2,
        )
        (tmp / SPM_FILE).write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_file=str(tmp / SPM_FILE))
        info = TokenizerInfo(
            kind="sentencepiece", source="train", vocab_size=sp.get_piece_size(), eod_id=sp.eos_id(),
            eod_token=sp.id_to_piece(sp.eos_id()), fingerprint=fingerprint_files(tmp, [SPM_FILE]),
        )
        atomic_write_json(tmp / INFO_FILE, info.__dict__)
    return info


def save_huggingface(name_or_dir: str, out_dir: str | Path) -> TokenizerInfo:
    """Resolve a hub name (local HF cache first, then the hub) or a local directory, and pin it."""
    from transformers import AutoTokenizer

    local = Path(name_or_dir).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_dir)
    except (OSError, ValueError) as e:
        where = "the directory" if local.is_dir() else "the local Hugging Face cache or the Hub"
        raise UserError(
            f"tokenizer.name={name_or_dir}: could not load a Hugging Face tokenizer from {where} "
            f"({brief(e, 160)}); download it (hf download {name_or_dir}) or set "
            f"tokenizer.name to a local directory or to 'train'"
        ) from None
    if not tok.is_fast:
        raise UserError(f"tokenizer.name={name_or_dir}: only fast (tokenizer.json) tokenizers are supported")
    eod = tok.eos_token
    if eod is None:
        raise UserError(f"tokenizer.name={name_or_dir}: the tokenizer defines no eos_token to use as EOD")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
        files = [p.name for p in tmp.iterdir() if p.is_file()]
        info = TokenizerInfo(
            kind="huggingface", source=name_or_dir, vocab_size=len(tok), eod_id=tok.convert_tokens_to_ids(eod),
            eod_token=eod, fingerprint=fingerprint_files(tmp, files),
        )
        atomic_write_json(tmp / INFO_FILE, info.__dict__)
    return info


# ---------------------------------------------------------------------------------------------
# Encoding


ENCODERS = ("auto", "reference", "gigatoken")


class Encoder:
    """Batch text -> token ids, as the tokenizer itself gives them.

    `backend` "reference" is the tokenizer's own library (sentencepiece, or HF `tokenizers`); "gigatoken" is the
    SIMD BPE encoder of the `gigatoken` package, used for data preparation only where it gives the reference's
    ids (choose_encoder). `threads`: encoder threads in this process (prep gives a unit the cores that no other
    unit uses; more threads never change the ids).
    """

    def __init__(self, directory: str | Path, backend: str = "reference", threads: int = 1):
        directory = Path(directory)
        self.info = read_info(directory)
        self.backend, self.threads = backend, max(1, threads)
        if self.info.kind not in ("sentencepiece", "huggingface"):
            raise UserError(f"{directory / INFO_FILE}: unknown tokenizer kind {self.info.kind!r}; rerun the tokenizer stage")
        self._literals: tuple[str, ...] = ()  # texts holding these go to sentencepiece (see _encode_gigatoken_flat)
        if self.info.kind == "sentencepiece":  # also gigatoken's, for the documents routed to it
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(directory / SPM_FILE))
            self.encode_batch = self._encode_sentencepiece
        elif backend == "reference":
            # tokenizers' batch encoding runs on its own (rayon) thread pool when allowed; it reads these once
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.threads > 1 else "false"
            os.environ["RAYON_NUM_THREADS"] = str(self.threads)
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self.encode_batch = self._encode_huggingface
        if backend == "gigatoken":
            self._gt = load_gigatoken(directory, self.info)
            self.encode_batch = self._encode_gigatoken
            if self.info.kind == "sentencepiece":
                self._literals = tuple(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())
                                       if self._sp.is_control(i) or self._sp.is_unknown(i))

    def _encode_sentencepiece(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=self.threads)

    def _encode_huggingface(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_gigatoken(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self._encode_gigatoken_flat(texts)
        return [ids.tolist() for ids in np.split(flat, np.cumsum(lengths)[:-1])] if len(texts) else []

    def _encode_gigatoken_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated, each text's number of ids).

        gigatoken reads a SentencePiece model's control pieces (`<s>`, `</s>`, `<unk>`) when they are written in a
        document; sentencepiece never does. Those documents (3 of the 1,710 of the sample corpus) go to
        sentencepiece; the rest to gigatoken, whose ids are then sentencepiece's (tested on whole corpora)."""
        import awkward as ak

        routed = {i for i, t in enumerate(texts) if any(s in t for s in self._literals)} if self._literals else set()
        fast = [t for i, t in enumerate(texts) if i not in routed] if routed else texts
        batch = self._gt.encode_batch(fast, parallel=self.threads > 1)
        flat, lengths = ak.to_numpy(ak.flatten(batch)), ak.to_numpy(ak.num(batch))
        if not routed:
            return flat, lengths
        order = sorted(routed)
        pieces = dict(zip(order, self._sp.encode([texts[i] for i in order], out_type=int)))
        fast_docs = iter(np.split(flat, np.cumsum(lengths)[:-1]) if len(fast) else [])
        docs = [np.asarray(pieces[i], flat.dtype) if i in pieces else next(fast_docs) for i in range(len(texts))]
        return np.concatenate(docs), np.array([len(d) for d in docs], np.int64)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text with EOD appended, in the on-disk dtype."""
        if self.backend == "gigatoken":  # one flat array from Rust, no Python list per document
            flat, lengths = self._encode_gigatoken_flat(texts)
        else:
            batch = self.encode_batch(texts)
            lengths = np.fromiter(map(len, batch), np.int64, len(batch))
            flat = np.fromiter(itertools.chain.from_iterable(batch), np.int64, int(lengths.sum()))
        return with_eod(flat, lengths, self.info.token_dtype, self.info.eod_id)


def with_eod(flat: np.ndarray, lengths: np.ndarray, dtype, eod: int) -> list[np.ndarray]:
    """Documents given as concatenated ids and their lengths -> one array per document, EOD appended."""
    if not len(lengths):
        return []
    ends = np.cumsum(lengths.astype(np.int64) + 1)  # each document's end, its EOD included
    out = np.empty(int(ends[-1]), dtype)
    keep = np.ones(len(out), bool)
    keep[ends - 1] = False
    out[keep] = flat
    out[ends - 1] = eod
    return np.split(out, ends[:-1])


def load_gigatoken(directory: Path, info: TokenizerInfo):
    try:
        import gigatoken
    except ImportError:
        raise UserError("prep.encoder=gigatoken: the gigatoken package is not installed; run `make setup`, "
                        "or set prep.encoder: reference") from None
    try:
        if info.kind == "sentencepiece":
            return gigatoken.Tokenizer.from_sentencepiece(directory / SPM_FILE)
        return gigatoken.Tokenizer(str(directory / "tokenizer.json"))
    except Exception as e:  # e.g. a byte-level BPE without all 256 byte tokens
        raise UserError(f"{directory}: gigatoken cannot load this tokenizer ({brief(e, 120)}); "
                        "set prep.encoder: auto or reference") from None


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first document whose ids differ, None if all agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if list(x) != list(y)), None if len(a) == len(b) else 0)


def choose_encoder(directory: str | Path, requested: str, probe: Callable[[], list[str]]) -> tuple[str, str]:
    """The encoder data preparation uses, and why: the fastest one that gives the tokenizer's own ids.

    "auto" takes gigatoken when it encodes `probe()` (real documents of the dataset) exactly as the tokenizer's own
    library does (tokenizers for HF byte-level BPE; sentencepiece, with documents that spell a control piece
    routed to sentencepiece itself), else the reference. "gigatoken" insists (an error where it differs);
    "reference" never uses it. Whole corpora: the tests, and `--verify`.
    """
    if requested not in ENCODERS:
        raise UserError(f"prep.encoder={requested!r} must be one of {', '.join(ENCODERS)}")
    info = read_info(directory)
    library = "sentencepiece" if info.kind == "sentencepiece" else "tokenizers"
    if requested == "reference":
        return "reference", f"{library} (prep.encoder={requested})"
    try:
        fast = Encoder(directory, "gigatoken")
    except UserError as e:
        if requested == "gigatoken":
            raise
        return "reference", f"{library} (gigatoken unusable here: {brief(e, 100)})"
    texts = probe()
    where = first_difference(Encoder(directory).encode_batch(texts), fast.encode_batch(texts))
    if where is None:
        return "gigatoken", f"gigatoken (same ids as {library} on the {len(texts):,} probe documents)"
    if requested == "gigatoken":
        raise UserError(f"prep.encoder=gigatoken gives other ids than {library} on probe document {where}; "
                        "set prep.encoder: auto (or reference)")
    return "reference", f"{library} (gigatoken differs on probe document {where})"


def build_tokenizer(cfg: TokenizerConfig, sample_texts: Iterator[str] | None) -> TokenizerInfo:
    """Train or pin the tokenizer `cfg` names into `cfg.dir`."""
    if cfg.name == "train":
        if sample_texts is None:
            raise UserError("tokenizer.name=train needs tokenizer.train_datasets to name prepared sources")
        return train_sentencepiece(sample_texts, cfg.dir, vocab_size=cfg.vocab_size, max_sentences=cfg.max_sentences,
                                   seed=cfg.seed)
    return save_huggingface(cfg.name, cfg.dir)
