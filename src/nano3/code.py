"""Which code ran: digests of the package's logic, for resumable work whose results dvc.lock attributes to code.

DVC reruns a stage when its code changes, but prep's receipts and a training run's checkpoints outlive the
process that wrote them; these digests say whether they came from the code now running. Comments, layout and
docstrings do not count: editing prose must not redo a dataset or split a run's record.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable

PACKAGE = Path(__file__).parent


def logic_digest(sources: Iterable[str]) -> str:
    """A digest of Python sources' syntax trees without docstrings."""
    h = hashlib.sha256()
    for text in sources:
        tree = ast.parse(text)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def code_digest(parts: Iterable[str]) -> str:
    """The logic of these package modules and folders (paths relative to the package, e.g. "train", "schedule.py")."""
    files = []
    for part in parts:
        path = PACKAGE / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    names = "\n".join(str(f.relative_to(PACKAGE)) for f in files)
    return logic_digest([names, *(f.read_text() for f in files)])
