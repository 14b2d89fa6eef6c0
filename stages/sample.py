"""Stage `sample`: build the embedded corpus (stdlib code + docs) under sample.out_dir."""

from nano3.cli import run_stage, stage_parser
from nano3.data.sample import build_sample_corpus


def main(args, params) -> None:
    manifest = build_sample_corpus(
        params.get_key("sample.out_dir", kind=str), params.get_key("sample.code_shards", kind=int),
        params.get_key("sample.docs_shards", kind=int), params.get_key("sample.exclude_dirs", [], kind=list))
    for name, d in manifest["datasets"].items():
        print(f"sample {name}: {d['documents']:,} documents, {d['chars']:,} characters (Python {manifest['python']})")


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
