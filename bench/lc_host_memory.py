"""Host memory of one long-context sample in a data-loader worker: megatron-core's default against ours.

    python bench/lc_host_memory.py [--lengths 4096,16384,32768] [--blend data/blend/lc.json]

megatron-core's GPTDatasetConfig builds a seq x seq causal mask with every sample (float32 ones, then a bool
copy) unless `create_attention_mask` is off; the recipe's attention never reads it. Issue 13's ranks were killed
at 64k and 128k tokens. Each measurement is a fresh process that builds the lc blend's dataset (megatron-core, on
the CPU) and reads two samples; printed: its peak RSS above the same process's peak before reading, with the mask
(megatron-core's default) and without it (train/mapping.py, data/megatron.py), and their ratio. Needs
`make blend` (or `make smoke`) first. The 64k and 128k rows are extrapolated (x4 per doubling, as the measured rows
grow) from the longest measured one: measuring them would take tens of GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, resource, sys
sys.path.insert(0, {src!r})
from pathlib import Path
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from nano3.data.megatron import megatron_tokenizer, prefixes_and_weights
from nano3.data.tokenizers import read_info

seq, mask = {seq}, {mask}
doc = json.loads(Path({blend!r}).read_text())
tok_dir = {tokenizer!r}
config = GPTDatasetConfig(random_seed=1, sequence_length=seq, blend_per_split=[prefixes_and_weights(doc["train"]), None, None],
                          tokenizer=megatron_tokenizer(tok_dir, read_info(tok_dir)), reset_position_ids=False,
                          reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=mask)
train = BlendedMegatronDatasetBuilder(GPTDataset, [4, 0, 0], lambda: True, config).build()[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
samples = [train[0], train[1]]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mib": (after - before) / 1024, "keys": sorted(samples[0])}}))
"""


def measure(seq: int, mask: bool, blend: Path, tokenizer: Path) -> dict:
    code = PROBE.format(src=str(ROOT / "src"), seq=seq, mask=mask, blend=str(blend), tokenizer=str(tokenizer))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--blend", type=Path, default=ROOT / "data" / "blend" / "lc.json")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer")
    args = ap.parse_args()
    if not args.blend.exists():
        sys.exit(f"error: {args.blend}: missing; run make blend (or make smoke) first")
    print(f"{'seq':>8} {'with mask MiB':>14} {'without MiB':>12} {'ratio':>8}")
    for seq in (int(s) for s in args.lengths.split(",")):
        with_mask = measure(seq, True, args.blend, args.tokenizer)
        without = measure(seq, False, args.blend, args.tokenizer)
        assert "attention_mask" in with_mask["keys"] and "attention_mask" not in without["keys"]
        ratio = with_mask["peak_mib"] / max(without["peak_mib"], 0.01)
        print(f"{seq:>8} {with_mask['peak_mib']:>14,.1f} {without['peak_mib']:>12,.1f} {ratio:>8,.0f}x")
    longest = seq
    for target in (65536, 131072):  # quadratic from the longest measured length
        print(f"{target:>8} {with_mask['peak_mib'] * (target / longest) ** 2:>14,.0f} {'':>12}  (extrapolated: "
              f"x{(target / longest) ** 2:.0f} the {longest:,} row, per worker reading a sample)")


if __name__ == "__main__":
    main()
