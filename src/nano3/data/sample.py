"""The embedded sample corpus: real text every Python installation ships, laid out like real data.

Two datasets, built offline and deterministically from this interpreter's standard library:
- `stdlib-code`: every `.py` source file, one document each, as Parquet shards;
- `stdlib-docs`: the pydoc topics and, per module, its docstrings (module, classes, functions),
  as JSONL shards.
Both carry a `text` field, so the rest of the pipeline reads them exactly as downloaded data.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nano3.files import atomic_dir, atomic_write_json


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(exclude_dirs: list[str]) -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 `.py` file in the stdlib, sorted by path."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in exclude_dirs for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately mis-encoded
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def module_documentation(rel_path: str, source: str) -> str | None:
    """A module's docstrings (module, public classes and functions) as one prose document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    module_name = rel_path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    if doc := ast.get_docstring(tree):
        parts.append(f"{module_name}\n\n{doc}")
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if doc := ast.get_docstring(node):
                parts.append(f"{module_name}.{node.name}\n\n{doc}")
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    is_method = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    if is_method and not item.name.startswith("_") and (doc := ast.get_docstring(item)):
                        parts.append(f"{module_name}.{node.name}.{item.name}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _split(rows: list[dict], shards: int) -> list[list[dict]]:
    """Contiguous, nearly equal shards (deterministic: depends only on the row order)."""
    shards = max(1, min(shards, len(rows)))
    size, extra = divmod(len(rows), shards)
    out, start = [], 0
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        out.append(rows[start:end])
        start = end
    return out


def build_sample_corpus(out_dir: str | Path, code_shards: int, docs_shards: int, exclude_dirs: list[str]) -> dict:
    """Write `<out_dir>/stdlib-code/*.parquet` and `<out_dir>/stdlib-docs/*.jsonl`; return the manifest."""
    sources = stdlib_sources(exclude_dirs)
    code_rows = [{"text": text, "path": rel} for rel, text in sources]
    docs_rows = [{"text": f"{name}\n\n{text}", "source": f"pydoc-topic:{name}"} for name, text in pydoc_topics()]
    for rel, text in sources:
        if doc := module_documentation(rel, text):
            docs_rows.append({"text": doc, "source": f"docstrings:{rel}"})

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "stdlib-code").mkdir()
        for i, rows in enumerate(_split(code_rows, code_shards)):
            table = pa.Table.from_pylist(rows, schema=pa.schema([("text", pa.string()), ("path", pa.string())]))
            pq.write_table(table, tmp / "stdlib-code" / f"part-{i:05d}.parquet", row_group_size=256)
        (tmp / "stdlib-docs").mkdir()
        for i, rows in enumerate(_split(docs_rows, docs_shards)):
            with open(tmp / "stdlib-docs" / f"part-{i:05d}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        manifest = {
            "python": sys.version.split()[0],
            "stdlib": str(stdlib_root()),
            "datasets": {
                "stdlib-code": {"documents": len(code_rows), "chars": sum(len(r["text"]) for r in code_rows)},
                "stdlib-docs": {"documents": len(docs_rows), "chars": sum(len(r["text"]) for r in docs_rows)},
            },
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def run(params, args) -> dict:
    """Stage `sample`."""
    cfg = params.settings.sample
    manifest = build_sample_corpus(cfg.out_dir, cfg.code_shards, cfg.docs_shards, list(cfg.exclude_dirs))
    for name, d in manifest["datasets"].items():
        print(f"sample {name}: {d['documents']:,} documents, {d['chars']:,} characters (Python {manifest['python']})")
    return manifest
