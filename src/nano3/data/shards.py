"""Where a prepared dataset's shards live, and the cheap and the full check that they are the bytes its manifest
names.

Storage design (README "Data at scale"): DVC tracks `<prep.out_dir>/<dataset>/manifest.json` alone. The shards go
to `<prep.shards_dir>/<dataset>/<version>/`, outside DVC's cache, where `version` names the plan and prep code that
wrote them; the manifest lists each shard with its size and sha256 (which prep computes as it writes). So DVC
hashes and caches kilobytes, not terabytes, a rerun of the same plan finds its shards in place, and going back to
an older experiment finds the older version beside the newer one. Their check is this module's, not DVC's: `make
verify-data` compares sizes (a stat per file) and with `--sha256` every byte; every reader checks sizes first.

    python -m nano3.data.shards [--sha256] [dataset ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nano3.errors import UserError
from nano3.files import read_json, sha256_file

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


def main(argv: list[str] | None = None) -> int:
    """`make verify-data`: every dataset of params.yaml (or those named) against its manifest."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from nano3.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help="default: every dataset in params.yaml that is prepared")
    parser.add_argument("--sha256", action="store_true", help="read every byte (default: sizes only, seconds)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:  # a bad params file, an unprepared dataset or a shard unlike its manifest: one line each
        params = load_params(args.params)
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
