"""Stage `prep`: tokenize one dataset (a key of `datasets` in params.yaml) into Megatron .bin/.idx shards."""

from nano3.cli import run_stage, stage_parser
from nano3.data.prep import prepare_dataset
from nano3.errors import UserError


def main(args, params) -> None:
    if not args.names:
        raise UserError("prep: name at least one dataset (a key of `datasets` in params.yaml)")
    step = "plan" if args.plan_only else "assemble" if args.assemble else "units" if args.units else "all"
    units_of = tuple(int(x) for x in args.units.split("/")) if args.units else None
    for name in args.names:
        m = prepare_dataset(params, name, workers=args.workers, sample_rows=args.sample, force=args.force,
                            step=step, units_of=units_of, verify=args.verify)
        if m is None:
            print(f"prep {name}: {step} step done")
            continue
        split = ", ".join(f"{s} {d['documents']:,} docs/{d['tokens']:,} tokens" for s, d in m["splits"].items())
        skipped = sum(m["skipped"].values())
        print(f"prep {name}: {split}; skipped {skipped:,} ({m['skipped']}); dtype {m['dtype']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--workers", type=int, default=None, help="processes (default prep.workers)")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="only the first N rows per dataset")
    parser.add_argument("--force", action="store_true", help="ignore finished work and redo the dataset")
    parser.add_argument("--verify", action="store_true",
                        help="also encode every document with the tokenizer's own library; fail on any difference")
    parser.add_argument("--plan-only", action="store_true", help="(job arrays) reset the work directory for this plan")
    parser.add_argument("--units", metavar="I/N", help="(job arrays) tokenize units I, I+N, ... and stop")
    parser.add_argument("--assemble", action="store_true", help="(job arrays) write the dataset from the units")
    run_stage(main, parser)
