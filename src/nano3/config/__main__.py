"""`python -m nano3.config --table [PARAMS]`: docs/parameters.md's table, generated from the typed sections' field
docs with the values of PARAMS (params.yaml: the embedded default). `--check PARAMS`: load and check a file."""

from __future__ import annotations

import argparse
import sys

from nano3.config.loader import load_params
from nano3.config.schema import field_docs
from nano3.config.sections import Settings
from nano3.errors import UserError


def parameter_table(params_file: str = "params.yaml") -> str:
    settings = load_params(params_file).settings
    lines = ["| key | embedded default | meaning |", "|---|---|---|"]
    for key, value, doc in field_docs(Settings, values=settings):
        shown = value.replace("|", "\\|").replace("\n", "\\n")
        if len(shown) > 60:
            shown = "see params.yaml"
        lines.append(f"| `{key}` | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--table", action="store_true", help="print docs/parameters.md's table")
    ap.add_argument("params", nargs="?", default="params.yaml")
    args = ap.parse_args()
    try:
        if args.table:
            sys.stdout.write(parameter_table(args.params))
        else:
            load_params(args.params)
            print(f"{args.params}: every key known and valid")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
