"""Stage `export`: the final pretrain or lc checkpoint (export.source) to a Hugging Face NemotronH directory."""

from nano3.cli import run_stage, stage_parser
from nano3.export.stage import export_stage


def main(args, params) -> None:
    record = export_stage(params)
    check = record["logits_check"]
    print(f"export: {record['source']} iteration {record['iteration']} -> {params.get_key('export.out_dir')}"
          + (f" (logits vs Megatron: relative L2 {check['rel_l2']:.2e}, max |diff| {check['max_abs_diff']:.3f}, "
             f"argmax agrees {check['top1_agreement']:.2%} of {check['tokens']} tokens)" if check else ""))


if __name__ == "__main__":
    run_stage(main, stage_parser(__doc__))
