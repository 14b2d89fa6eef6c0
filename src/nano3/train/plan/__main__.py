"""`python -m nano3.train.plan --lc-layouts`: the recipe's long-context layouts and whether they fit."""

from __future__ import annotations

from nano3.errors import UserError
from nano3.train.plan import production_lc_layouts
from nano3.train.plan.memory import DEFAULT_GPU_MEMORY_GIB


def main(argv: list[str] | None = None) -> None:
    """`python -m nano3.train.plan --lc-layouts [--params configs/nano3.yaml] [--gpu-memory GIB]`."""
    import argparse
    import sys

    from rich.console import Console
    from rich.table import Table

    from nano3.config import load_params

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--lc-layouts", action="store_true", help="the recipe's long-context layouts at 512k and 1M")
    ap.add_argument("--params", default="configs/nano3.yaml")
    ap.add_argument("--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GIB, metavar="GIB")
    args = ap.parse_args(argv)
    if not args.lc_layouts:
        ap.error("nothing to print; pass --lc-layouts")
    try:
        rows = production_lc_layouts(load_params(args.params), args.gpu_memory)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = Table(title=f"Production long-context layouts ({args.params}, {args.gpu_memory:.1f} GiB GPUs; estimates)")
    for column in ("sequence", "GPUs", "layout", "GiB/GPU", "fits", "nearest layouts that fit"):
        table.add_column(column)
    for r in rows:
        alternatives = "; ".join(f"{keys} ({gib:.1f} GiB)" for keys, gib in r["alternatives"])
        table.add_row(f"{r['seq_length']:,}", str(r["gpus"]), r["layout"], f"{r['gib']:.1f}",
                      "yes" if r["fits"] else "no", alternatives or "-")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
