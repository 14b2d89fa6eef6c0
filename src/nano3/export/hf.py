"""The tokenizer files of an exported model: what `AutoTokenizer.from_pretrained` loads beside the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nano3.data.tokenizers import SPM_FILE, read_info
from nano3.errors import UserError


def save_hf_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """Tokenizer files `AutoTokenizer.from_pretrained(out_dir)` loads, encoding exactly as training did.

    A SentencePiece model becomes a fast (tokenizer.json) BPE tokenizer through transformers'
    converter; `split_special_tokens` keeps '</s>' written in a document as plain text, as
    SentencePiece does. A Hugging Face tokenizer is copied as pinned by the tokenizer stage.
    """
    from transformers import AutoTokenizer

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    info = read_info(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.kind == "huggingface":
        for path in tokenizer_dir.iterdir():
            if path.is_file() and path.name != "info.json":
                shutil.copy2(path, out_dir / path.name)
        return
    if info.kind != "sentencepiece":
        raise UserError(f"{tokenizer_dir}/info.json: unknown tokenizer kind {info.kind!r}; rerun the tokenizer stage")
    staging = out_dir / ".spm"
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_dir / SPM_FILE, staging / SPM_FILE)
    (staging / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False, "add_bos_token": False,
        "add_eos_token": False, "split_special_tokens": True, "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": info.eod_token, "pad_token": info.eod_token,
    }))
    AutoTokenizer.from_pretrained(staging).save_pretrained(out_dir)
    shutil.rmtree(staging)
    # transformers writes the load's `local_files_only` (True under HF_HUB_OFFLINE) into the saved config: a setting of
    # the machine that exported, which would make the export's bytes depend on it
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.pop("local_files_only", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
