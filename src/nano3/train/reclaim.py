"""`make clean-runs`: remove the training runs that nothing refers to any more.

Every experiment trains into its own run directory (checkpoints/<stage>/<run digest>/), and `dvc exp remove` or
`dvc gc` never touch them: DVC tracks the small stage manifest (checkpoints/<stage>.json), not the tree. A run is
kept while a manifest names it: the workspace's, or the one recorded in dvc.lock by any commit of a branch, tag or
stash, or any experiment (refs/exps; the manifest's bytes come from DVC's cache). A run being trained (its lock held)
is always kept. What remains is removed, unfinished runs included (a resumable run of a configuration no
experiment kept).

    python -m nano3.train.reclaim [--dry-run]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from nano3.config import load_params
from nano3.errors import UserError
from nano3.files import tree_size
from nano3.train import rundir

STAGES = ("pretrain", "lc")


def kept_refs(repo: Path) -> list[str]:
    """Branches, tags, remotes, the user's stash and DVC's experiments (refs/exps/<xx>/<baseline>/<name>); not DVC's
    own bookkeeping (refs/exps/apply/stash keeps the workspace `dvc exp apply` replaced, exec/ and celery/ its
    runners), which would keep every run ever applied away from."""
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)"], cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise UserError(f"{repo}: git for-each-ref failed ({out.stderr.strip()}); run this in the repository's checkout")
    refs = out.stdout.split()
    return [r for r in refs if r.startswith(("refs/heads/", "refs/tags/", "refs/remotes/")) or r == "refs/stash"
            or (r.startswith("refs/exps/") and len(r.split("/")) == 5 and r.split("/")[2] not in ("apply", "exec",
                                                                                                 "celery", "temp"))]


def lock_files(repo: Path) -> list[str]:
    """dvc.lock as every commit that changed it recorded it (a commit that did not has its parent's), on every
    kept ref's history."""
    refs = kept_refs(repo)
    if not refs:
        return []
    out = subprocess.run(["git", "log", "--format=%H", *refs, "--", "dvc.lock"], cwd=repo, capture_output=True,
                         text=True)
    if out.returncode:
        raise UserError(f"{repo}: git log failed ({out.stderr.strip()}); run this in the repository's checkout")
    texts = []
    for commit in out.stdout.split():
        shown = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0:
            texts.append(shown.stdout)
    return texts


def recorded_manifests(lock_text: str, manifest_paths: dict[str, str]) -> list[str]:
    """The md5s a dvc.lock gives the training stages' manifests."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    found = []
    for stage, path in manifest_paths.items():
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path") == path and out.get("md5"):
                found.append(out["md5"])
    return found


def referenced_runs(repo: Path, train) -> set[tuple[str, str]]:
    """(stage, run digest) of every run a manifest names: the workspace's and every recorded one still in the cache."""
    from dvc.repo import Repo

    paths = {stage: str(rundir.manifest_path(train, stage)) for stage in STAGES}
    manifests = [repo / p for p in paths.values() if (repo / p).exists()]
    cache = Repo(str(repo)).cache.local
    for text in lock_files(repo):
        manifests += [Path(cache.oid_to_path(md5)) for md5 in recorded_manifests(text, paths)]
    runs = set()
    for path in manifests:
        if path.exists():
            doc = json.loads(path.read_text())
            runs.add((doc["stage"], doc["digest"]))
    return runs


def in_training(run: Path) -> bool:
    lock = run / rundir.LOCK
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no flock on this file system: cannot tell, so keep it
        return True
    finally:
        os.close(fd)


def unreferenced_runs(repo: Path, train) -> list[Path]:
    keep = referenced_runs(repo, train)
    return [run for stage in STAGES for run in rundir.runs(train, stage)
            if run.is_dir() and (stage, run.name) not in keep and not in_training(run)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nano3.train.reclaim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=os.environ.get("NANO3_PARAMS", "params.yaml"))
    ap.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = ap.parse_args(argv)
    try:
        train = load_params(args.params).settings.train
        runs = unreferenced_runs(Path.cwd(), train)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    total = 0.0
    for run in runs:
        gib = tree_size(run)[0] / 2**30
        total += gib
        state = f"at iteration {rundir.latest_iteration(run)}"
        print(f"{'would remove' if args.dry_run else 'removing'} {run} ({state}, {gib:.2f} GiB)")
        if not args.dry_run:
            shutil.rmtree(run)
    verb = "would free" if args.dry_run else "freed"
    print(f"clean-runs: {len(runs)} run(s) no commit, experiment or workspace refers to; {verb} {total:.2f} GiB")


if __name__ == "__main__":
    main()
