"""Stage `prep`: tokenize one dataset (a key of `datasets` in params.yaml) into Megatron .bin/.idx shards."""

from nano3.cli import run_stage, stage_parser
from nano3.data.prep import prepare_dataset
from nano3.errors import UserError


def main(args, params) -> None:
    if not args.names:
        raise UserError("prep: name at least one dataset (a key of `datasets` in params.yaml)")
    for name in args.names:
        m = prepare_dataset(params, name, workers=args.workers, sample_rows=args.sample, force=args.force)
        split = ", ".join(f"{s} {d['documents']:,} docs/{d['tokens']:,} tokens" for s, d in m["splits"].items())
        skipped = sum(m["skipped"].values())
        print(f"prep {name}: {split}; skipped {skipped:,} ({m['skipped']}); dtype {m['dtype']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--workers", type=int, default=None, help="processes (default prep.workers)")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="only the first N rows per dataset")
    parser.add_argument("--force", action="store_true", help="ignore finished work and redo the dataset")
    run_stage(main, parser)
