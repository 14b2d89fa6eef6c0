"""The one stage convention: every stage is `run(params, args) -> summary`, started the same way.

    stages/<stage>.py:   stage_main(run, __doc__[, add_options][, stage=...])

`stage_main` parses `[--params FILE] [name ...] [key=value ...] [bridge.<section>.<field>=value ...]`, loads and
checks params.yaml with the overrides (nano3.config), calls `run` and turns a UserError into `error: <one line>`
and exit status 2 (exit 3: a training stage stopped at a checkpoint, rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from nano3.config import Params, load_params
from nano3.config.overrides import split_cli_overrides
from nano3.errors import UserError

Run = Callable[[Params, argparse.Namespace], dict | None]


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=os.environ.get("NANO3_PARAMS", "params.yaml"),
                        help="parameter file (default params.yaml)")
    parser.add_argument("items", nargs="*", metavar="[name ...] [key=value ...]",
                        help="names the stage acts on, params.yaml overrides such as train.lr=3e-4, and Megatron-"
                             "Bridge fields as bridge.model.recompute_granularity=full (training stages)")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)
    args.names = [item for item in args.items if "=" not in item]
    args.overrides, args.bridge = split_cli_overrides([item for item in args.items if "=" in item])
    return args


def stage_main(run: Run, description: str, add_options: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, **defaults) -> None:
    parser = stage_parser(description)
    if add_options:
        add_options(parser)
    parser.set_defaults(**defaults)
    try:
        args = parse_stage_args(parser, argv)
        if args.bridge and not getattr(args, "takes_bridge_overrides", False):
            raise UserError(f"{', '.join('bridge.' + b for b in args.bridge)}: Megatron-Bridge fields apply to the "
                            f"training stages (pretrain, lc) only")
        run(load_params(args.params, args.overrides), args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
