"""Packages a bare image lacks, installed at job start (the profile's `image_extras = "install"`) into
.nano3-extras/ of the submit directory, once per image and requirements file.

    python -m nano3.extras containers/requirements.txt    # prints the folder to add to PYTHONPATH

Two kinds, both through containers/install_extras.sh:
- nano3's packages (containers/requirements.txt): only what the image lacks, in versions that fit every package it
  has. Nothing the image has is installed again, so the folder shadows nothing.
- the side folder of export and eval (containers/nemotron-h.txt, `side=True`): transformers' NemotronH is new in
  transformers 5 and the recipe image has 4.57. Its pins and what they need beyond the image go into a folder put
  first on the path of those two stages only; torch, numpy and the training stack stay the image's, and the
  training stages keep the image's transformers.

The folder's name holds a digest of the requirements file and of the image's `pip freeze`: another image (a new
container_image in the profile) installs afresh instead of reusing a resolution made for the old one. Each task
installs into a private folder and renames it into place: concurrent tasks on shared storage never see half an
install, and the loser of the rename uses the winner's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nano3
from nano3.errors import UserError

ROOT = Path(nano3.__file__).resolve().parents[2]  # the checkout, or the job's frozen copy of it
NEMOTRON_H = ROOT / "containers" / "nemotron-h.txt"
INSTALL = ROOT / "containers" / "install_extras.sh"
BAKED = "/opt/nano3/nemotron-h"  # the side folder in an image `make container` built (NANO3_NEMOTRON_H_DIR: elsewhere)


def image_digest() -> str:
    """This Python's installed packages (what the resolution is made against), as a short digest."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True)
    return hashlib.sha256("\n".join(sorted(freeze.stdout.split())).encode()).hexdigest()[:10]


def folder_for(requirements: Path, base: Path) -> Path:
    tag = hashlib.sha256(requirements.read_bytes()).hexdigest()[:10]
    return base / f"{requirements.stem}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}-{image_digest()}"


def install_into(requirements: Path, folder: Path, side: bool, *pip_args: str, **run) -> subprocess.CompletedProcess:
    """containers/install_extras.sh into `folder` (its constraints beside), with this Python's pip, not PATH's."""
    cmd = ["bash", str(INSTALL), str(requirements), str(folder / "constraints.txt"), *(["--side"] if side else []),
           *pip_args, "--target", str(folder)]
    return subprocess.run(cmd, env={**os.environ, "PYTHON": sys.executable}, **run)


def install_once(requirements: Path, side: bool = False, base: Path | None = None, log=print) -> Path:
    """The folder holding `requirements` for this image, installed by this call if no task has yet."""
    final = folder_for(requirements, base or Path.cwd() / ".nano3-extras")
    if (final / ".complete").exists():
        return final
    task = f"{os.environ.get('SLURM_NODEID', 0)}.{os.environ.get('SLURM_PROCID', 0)}.{os.getpid()}"
    work = final.with_name(f"{final.name}.tmp.{task}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"nano3: installing {requirements.name} into {final} (image_extras = install{', export/eval only' if side else ''})")
    done = install_into(requirements, work, side, "--quiet", stdout=sys.stderr,  # stdout: the folder only
                        stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].removeprefix("error: ")
        raise UserError(f"{requirements}: the job-start install failed: {why}")
    (work / ".complete").touch()
    try:
        work.rename(final)
    except OSError:  # another task won the rename: use its install
        shutil.rmtree(work, ignore_errors=True)
    return final


def has_nemotron_h() -> bool:
    """transformers' NemotronH model is importable (found by the import system, not imported)."""
    try:
        return importlib.util.find_spec("transformers.models.nemotron_h") is not None
    except ModuleNotFoundError:
        return False


def ensure_nemotron_h() -> None:
    """Export and eval load transformers' NemotronH. On an image without it, with `image_extras = "install"`, the
    side folder is installed (once) and the stage runs again with it first on PYTHONPATH; otherwise it stops
    here, before any work, in one line saying what to set."""
    if has_nemotron_h():
        return
    import transformers  # noqa: F401  (only its version, for the message)

    baked = Path(os.environ.get("NANO3_NEMOTRON_H_DIR", BAKED))  # where `make container` bakes the side folder
    baked = baked if (baked / "INSTALLED.txt").is_file() else None
    have = f"transformers {transformers.__version__}"
    if os.environ.get("NANO3_NEMOTRON_H_SIDE"):
        raise UserError(f"{os.environ['NANO3_NEMOTRON_H_SIDE']}: the side folder gave {have}, without NemotronH; "
                        "remove the folder and rerun (the job installs it again)")
    if os.environ.get("NANO3_IMAGE_EXTRAS") != "install" and not baked:
        raise UserError(f"{have} has no NemotronH model, which export and eval load (transformers >= 5): set the "
                        "profile's image_extras = \"install\" (or NANO3_IMAGE_EXTRAS=install here) to install "
                        f"{NEMOTRON_H.relative_to(ROOT)} beside the image for these stages, or use an image with "
                        "transformers >= 5 (docs/stacks.md)")
    side = baked or install_once(NEMOTRON_H, side=True)
    print(f"nano3: {have} lacks NemotronH: this stage runs with {side} first on PYTHONPATH", flush=True)
    path = os.pathsep.join(filter(None, [str(side), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "NANO3_NEMOTRON_H_SIDE": str(side)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def bake(folder: Path) -> None:
    """`make container`: the side folder into the image (at BAKED, where ensure_nemotron_h finds it), where its
    transformers lacks NemotronH; nothing where it has it."""
    if has_nemotron_h():
        print(f"nano3: this image's transformers has NemotronH: no side folder at {folder}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    done = install_into(NEMOTRON_H, folder, True)
    if done.returncode != 0:
        raise UserError(f"{NEMOTRON_H}: the side folder's install failed (exit {done.returncode})")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and args[0] != "--bake"):
        print("usage: python -m nano3.extras REQUIREMENTS | --bake FOLDER", file=sys.stderr)
        raise SystemExit(2)
    try:
        if args[0] == "--bake":
            bake(Path(args[1]))
            return
        print(install_once(Path(args[0]).resolve(), log=lambda m: print(m, file=sys.stderr)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
