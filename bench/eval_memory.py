"""Where eval's and export's GPU memory goes beside the weights, phase by phase and layer kind by layer kind: the
measurements behind the working-set constants of nano3/export/footprint.py.

    python bench/eval_memory.py [--experts 8] [--lengths 4096,16384,65536] [--chunk 4096]

Builds transformers' NemotronH for the nano3 preset (random BF16 weights, straight on the GPU; `--experts` keeps
it small, the working set does not depend on the expert count) and runs eval's own functions on random tokens:
the decoder alone at each length, then loss by position and a pass-key answer at each length, and export's logits
comparison on 4,096 tokens. For each it prints the peak the PyTorch allocator held beyond the weights (allocated
and reserved), and for the decoder the largest transient of each layer kind (mamba, attention, moe). GPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30
VOCAB = 131072


def random_model(experts: int):
    import torch
    from transformers import AutoModelForCausalLM

    from nano3.config import load_params
    from nano3.model.hf import nemotron_h_config
    from nano3.model.presets import model_preset

    params = load_params(str(ROOT / "params.yaml"), ["model.preset=nano3", f"model.overrides.num_moe_experts={experts}"])
    config = nemotron_h_config(model_preset(params.settings.model), VOCAB, 0, 262144)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


class KindPeaks:
    """The largest allocation growth inside one layer's forward, per layer kind (hooks on the blocks)."""

    def __init__(self, model):
        import torch

        self.peaks: dict[str, float] = {}
        self.torch = torch
        self.hooks = [hook for block in model.model.layers
                      for hook in (block.register_forward_pre_hook(self.before), block.register_forward_hook(self.after))]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def before(self, module, args):
        self.torch.cuda.synchronize()
        self.start = self.torch.cuda.memory_allocated()
        self.torch.cuda.reset_peak_memory_stats()

    def after(self, module, args, output):
        self.torch.cuda.synchronize()
        grown = (self.torch.cuda.max_memory_allocated() - self.start) / GIB
        self.peaks[module.block_type] = max(self.peaks.get(module.block_type, 0.0), grown)


def phase(name: str, weights: int, fn, results: dict) -> None:
    import torch

    from nano3.model.hf import free_gpu_memory

    free_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    row = {"allocated_gib": (torch.cuda.max_memory_allocated() - weights) / GIB,
           "reserved_gib": (torch.cuda.max_memory_reserved() - weights) / GIB}
    results[name] = row
    print(f"{name:32s} allocated +{row['allocated_gib']:6.2f} GiB, reserved +{row['reserved_gib']:6.2f} GiB",
          flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--chunk", type=int, default=4096, help="eval.logits_chunk_tokens")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--as-before", action="store_true", help="without MoE chunks and expandable segments")
    args = parser.parse_args(argv)
    from nano3.model.hf import chunk_moe_tokens, steady_gpu_allocator

    if not args.as_before:
        steady_gpu_allocator()
    import torch

    from nano3.export.megatron import LogitsDifference
    from nano3.model.logits import answer_logits, hidden_states, logit_chunks, position_losses

    model = random_model(args.experts)
    if not args.as_before:
        chunk_moe_tokens(model)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    print(f"weights {weights / GIB:.2f} GiB ({args.experts} experts)", flush=True)
    results: dict = {"weights_gib": weights / GIB}
    ids = {n: torch.randint(0, VOCAB, (1, n + 1), device="cuda") for n in map(int, args.lengths.split(","))}
    for n, x in ids.items():
        kinds = KindPeaks(model) if n == max(ids) else None
        with torch.no_grad():
            phase(f"decoder {n}", weights, lambda: hidden_states(model, x[:, :-1]), results)
        if kinds:
            results["layer_kinds_at_longest"] = kinds.peaks
            print("  per layer kind at the longest:", {k: round(v, 2) for k, v in kinds.peaks.items()}, flush=True)
            kinds.remove()
        phase(f"loss by position {n}", weights, lambda: position_losses(model, x, args.chunk), results)
        phase(f"pass-key answer {n}", weights, lambda: answer_logits(model, x[:, :-1], 8, args.chunk), results)

    def logits_check():
        x = ids[min(ids, key=lambda n: abs(n - 4096))][:, :4096]
        ours = torch.cat([c for _, c in logit_chunks(model, x, args.chunk)], dim=1).cpu()
        difference = LogitsDifference()
        for start, theirs in logit_chunks(model, x, args.chunk):
            difference.add(ours[:, start:start + theirs.shape[1]].to(theirs.device), theirs)

    phase("export's logits comparison 4096", weights, logits_check, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
