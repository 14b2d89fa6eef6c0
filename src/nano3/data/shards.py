"""Where a prepared dataset's shards live, and the cheap and the full check that they are the bytes its manifest
names.

Storage design (docs/data.md, "Data at scale"): DVC tracks `<prep.out_dir>/<dataset>/manifest.json` alone. The shards go
to `<prep.shards_dir>/<dataset>/<version>/`, outside DVC's cache, where `version` names the plan and prep code that
wrote them; the manifest lists each shard with its size and sha256 (which prep computes as it writes). So DVC
hashes and caches kilobytes, not terabytes, a rerun of the same plan finds its shards in place, and going back to
an older experiment finds the older version beside the newer one. Their check is this module's, not DVC's: `make
verify-data` compares sizes (a stat per file) and with `--sha256` every byte; every reader checks sizes first.

    python -m nano3.data.shards [--sha256] [dataset ...]
    python -m nano3.data.shards --prune [--apply]     # what no dataset of params.yaml uses; --apply removes it

Old versions stay until pruned: they are what makes going back to an older experiment free. `make prune-data` lists
what no dataset of params.yaml uses now (a removed dataset's manifest, work and shards; shard versions other than the
one each manifest names) with its size; `APPLY=1` removes it, after which going back re-prepares those datasets.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from nano3.errors import UserError
from nano3.files import read_json, sha256_file, tree_size

MANIFEST = "manifest.json"
SUFFIXES = (".bin", ".idx")


def manifest_path(prep, name: str) -> Path:
    return Path(prep.out_dir) / name / MANIFEST


def shard_prefix(manifest: dict, shard: dict) -> Path:
    """The path megatron-core's reader takes (without .bin/.idx) for one shard of a manifest."""
    return Path(manifest["shards_dir"]) / shard["prefix"]


def shard_files(manifest: dict, splits=None):
    """(path, expected size, expected sha256) of every file of the shards of `splits` (default: all)."""
    for split in splits or manifest["splits"]:
        for shard in manifest["splits"][split]["shards"]:
            for suffix in SUFFIXES:
                key = suffix[1:]
                yield Path(f"{shard_prefix(manifest, shard)}{suffix}"), shard[f"bytes_{key}"], shard[f"sha256_{key}"]


def check_shards(manifest: dict, splits=None, *, sha256: bool = False, progress=None) -> None:
    """Raise a one-line UserError at the first shard file (of `splits`, default all) that is missing, of another
    size, or (with `sha256`) of other bytes than the manifest names."""
    name = manifest["dataset"]
    fix = f"rerun `dvc repro -f prep@{name}`"
    for path, size, digest in shard_files(manifest, splits):
        if not path.is_file():
            raise UserError(f"{path}: missing, but the manifest of dataset '{name}' names it; {fix}")
        if path.stat().st_size != size:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, but the manifest of dataset '{name}' says "
                            f"{size:,}; the shard was changed or cut short; {fix}")
        if sha256 and sha256_file(path) != digest:
            raise UserError(f"{path}: its sha256 differs from the manifest of dataset '{name}' (corrupt or "
                            f"changed); {fix}")
        if progress:
            progress(size)


def unused(prep, datasets) -> list[Path]:
    """Folders under prep's three directories that no dataset in `datasets` uses: a removed dataset's manifest, work
    and shards folders, and every shard version but the one its dataset's current manifest names."""
    out: list[Path] = []
    for root in (Path(prep.out_dir), Path(prep.work_dir)):
        out += [d for d in sorted(root.glob("*")) if d.is_dir() and d.name not in datasets]
    for folder in sorted(Path(prep.shards_dir).glob("*")):
        if not folder.is_dir():
            continue
        if folder.name not in datasets:
            out.append(folder)
            continue
        manifest = manifest_path(prep, folder.name)
        current = Path(read_json(manifest, "manifest")["shards_dir"]).resolve() if manifest.exists() else None
        out += [v for v in sorted(folder.glob("*")) if v.is_dir() and v.resolve() != current]
    return out


def prune(params, apply: bool) -> int:
    """`make prune-data`: list (and with `apply` remove) what `unused` finds; returns the bytes it holds."""
    found = [(path, tree_size(path)[0]) for path in unused(params.settings.prep, set(params.settings.datasets))]
    for path, size in found:
        print(f"{'removed' if apply else 'unused'}: {path} ({size / 2**30:.2f} GiB)")
        if apply:
            shutil.rmtree(path)
    total = sum(size for _, size in found)
    verb = "removed" if apply else "to remove with APPLY=1 (an older experiment's datasets are then prepared again)"
    print(f"prune-data: {len(found)} folders, {total / 2**30:.2f} GiB {verb}" if found else
          "prune-data: every folder is in use")
    return total


def main(argv: list[str] | None = None) -> int:
    """`make verify-data`: every dataset of params.yaml (or those named) against its manifest."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from nano3.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help="default: every dataset in params.yaml that is prepared")
    parser.add_argument("--sha256", action="store_true", help="read every byte (default: sizes only, seconds)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prune", action="store_true", help="list what no dataset of params.yaml uses (make prune-data)")
    parser.add_argument("--apply", action="store_true", help="with --prune: remove it")
    args = parser.parse_args(argv)
    try:  # a bad params file, an unprepared dataset or a shard unlike its manifest: one line each
        params = load_params(args.params)
        if args.prune:
            prune(params, args.apply)
            return 0
        prep = params.settings.prep
        names = args.datasets or [n for n in params.settings.datasets if manifest_path(prep, n).exists()]
        manifests = [read_json(manifest_path(prep, n), f"prepared dataset '{n}' (run make prep)") for n in names]
        total = sum(size for m in manifests for _, size, _ in shard_files(m))
        with Progress("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      disable=not args.sha256) as bar:
            task = bar.add_task("sha256", total=total)
            for manifest in manifests:
                check_shards(manifest, sha256=args.sha256, progress=lambda n: bar.advance(task, n))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    how = "sha256 of every byte" if args.sha256 else "sizes"
    print(f"verify-data: {len(manifests)} datasets, {total / 2**30:.2f} GiB of shards match their manifests ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
