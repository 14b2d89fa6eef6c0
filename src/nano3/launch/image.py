"""Can this container image run nano3's stages? Checked at the start of every Slurm job (quick) and when an
image is built (full).

    python -m nano3.launch.image           # quick: nano3's own packages are importable (no imports, ~0.1 s)
    python -m nano3.launch.image --full    # and the training stack: Bridge's Nano 3 recipe, our entry module,
                                           # dvclive, and what this Bridge can do (megatron_compat)

The NeMo image brings torch, Megatron-Core/Bridge and Transformer Engine but not DVC or dvclive: a job on the
bare image stops here in one line saying so, instead of failing in its first metric write an hour later.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import nano3  # noqa: F401
from nano3.errors import UserError

# What nano3 needs on top of the NeMo image (containers/requirements.txt pins them): import name -> package.
EXTRAS = {"dvc": "dvc", "dvclive": "dvclive", "sentencepiece": "sentencepiece", "ruamel.yaml": "ruamel.yaml",
          "zstandard": "zstandard", "rich": "rich", "tqdm": "tqdm", "yaml": "pyyaml", "datasets": "datasets",
          "pyarrow": "pyarrow", "matplotlib": "matplotlib", "psutil": "psutil"}
TRAINING = {"megatron.core": "megatron-core", "megatron.bridge": "megatron-bridge",
            "transformer_engine": "transformer-engine", "torch": "torch"}
FIX = ("build the nano3 image (`make container`, containers/README.md) and set the profile's container_image to "
       "it, or set `image_extras = \"install\"` in the profile to install them at job start")


def missing(modules: dict[str, str]) -> list[str]:
    """Packages whose module cannot be found (found by the import system, not imported)."""
    out = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is absent
            found = False
        if not found:
            out.append(package)
    return out


def check_extras() -> None:
    lacking = missing(EXTRAS)
    if lacking:
        raise UserError(f"this image lacks nano3's packages {', '.join(lacking)} (containers/requirements.txt); {FIX}")


def bridge_capabilities() -> dict[str, object]:
    """What the installed Bridge offers, as megatron_compat detects it (imports Bridge: seconds)."""
    from megatron.bridge.recipes.nemotronh.nemotron_3_nano import nemotron_3_nano_pretrain_config
    from megatron.bridge.training.pretrain import pretrain

    from nano3.megatron_compat import installed_stack, model_pattern, nemotron_h_classes, takes_callbacks

    cfg = nemotron_3_nano_pretrain_config()
    try:
        nemotron_h_classes()
        hf_export = True
    except UserError:
        hf_export = False
    return {**installed_stack(),
            "layer pattern field": "hybrid_layer_pattern" if hasattr(cfg.model, "hybrid_layer_pattern")
            else "hybrid_override_pattern",
            "recipe pattern": model_pattern(cfg.model),
            "validation section": hasattr(cfg, "validation"),
            "tokenizer.use_tokenizer_vocab_size": hasattr(cfg.tokenizer, "use_tokenizer_vocab_size"),
            "pretrain(callbacks=)": takes_callbacks(pretrain),
            "HF export (transformers NemotronH)": hf_export}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also import and inspect the training stack")
    args = ap.parse_args(argv)
    try:
        check_extras()
        if args.full:
            lacking = missing(TRAINING)
            if lacking:
                raise UserError(f"this image lacks the training stack ({', '.join(lacking)}); use the NeMo image "
                                "nvcr.io/nvidia/nemo:25.11.nemotron_3_nano or newer")
            import dvclive  # noqa: F401

            import nano3.train.entry  # noqa: F401

            for key, value in bridge_capabilities().items():
                print(f"  {key}: {value}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("image ok" + (": nano3's packages and the training stack" if args.full else ": nano3's packages"))


if __name__ == "__main__":
    main()
