"""Atomic writes and checksums: nothing half-written may survive a crash or a kill.

Every output is written under a temporary name in the same directory and renamed into place,
so a reader sees either the old file, the complete new one, or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _renamed_into_place(path: Path) -> Iterator[str]:
    """A temporary file beside `path` to fill; renamed to `path` when the block ends, removed if it raises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _renamed_into_place(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """`source`'s bytes at `path`, copied under a temporary name and renamed into place."""
    with _renamed_into_place(Path(path)) as tmp:
        shutil.copyfile(source, tmp)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_figure(fig, path: str | Path, dpi: int) -> None:
    """A matplotlib figure as an image at `path` (written under a temporary name, then renamed), then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str):
    """Read a JSON file we wrote earlier; a missing or broken one is a user-facing error."""
    from nano3.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun")


def link_or_copy(source: str, target: str) -> str:
    """A hard link where the file system allows one (no second copy of a large file), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def tree_size(root: str | Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under `root`, symlinks not followed (a link is not a copy). A file that
    vanishes while the tree is walked (a cache being written, a run being removed) is skipped."""
    total = count = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
                count += 1
    return total, count
