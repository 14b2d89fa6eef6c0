"""What every stage entry in stages/ shares: --params, key=value overrides, one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from nano3.config import Params, load_params
from nano3.errors import UserError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=os.environ.get("NANO3_PARAMS", "params.yaml"),
                        help="parameter file (default params.yaml)")
    parser.add_argument("items", nargs="*", metavar="[name ...] [key=value ...]",
                        help="names the stage acts on, and parameter overrides such as train.lr=3e-4")
    return parser


def run_stage(main: Callable[[argparse.Namespace, Params | None], int | None], parser: argparse.ArgumentParser,
              argv: list[str] | None = None, load: bool = True) -> None:
    """Parse, load params (unless the stage loads them itself), run; a UserError becomes
    `error: <one line>` and exit status 2."""
    args = parser.parse_intermixed_args(argv)
    args.overrides = [item for item in args.items if "=" in item]
    args.names = [item for item in args.items if "=" not in item]
    try:
        code = main(args, load_params(args.params, args.overrides) if load else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
