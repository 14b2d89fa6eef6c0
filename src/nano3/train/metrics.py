"""Training metrics through dvclive, from one rank: loss, LR, grad norm, throughput, MoE load balance.

Throughput is reported twice: TFLOP/s/GPU with the model's true Mamba width and with the formula
Megatron-Bridge prints (which over-counts Mamba, flops.py). Load balance comes from forward hooks on
the MoE routers: tokens routed to each expert since the last log, as max/mean over experts (1.0 is
perfectly balanced), averaged over MoE layers.

Metrics live in `dvclive/<stage>/` (a persistent DVC out): on resume, rows past the checkpoint's
iteration (logged by the killed run after its last checkpoint) are dropped so curves stay single-valued.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path


def truncate_metrics(live_dir: str | Path, last_step: int) -> None:
    """Drop history rows with step > last_step from every dvclive metrics TSV under live_dir."""
    for tsv in Path(live_dir).glob("plots/metrics/**/*.tsv"):
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            continue
        header, body = rows[0], rows[1:]
        step_col = header.index("step")
        kept = [r for r in body if int(r[step_col]) <= last_step]
        if len(kept) != len(body):
            tmp = tsv.with_suffix(".tsv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *kept])
            tmp.replace(tsv)


def scalar(value) -> float:
    """A reduced loss as Bridge hands it over: a number, a 0-d tensor, or a (sum, count) pair."""
    if isinstance(value, (tuple, list)):
        return float(value[0]) / max(float(value[1]), 1e-12)
    if hasattr(value, "numel") and value.numel() == 2:
        return float(value[0]) / max(float(value[1]), 1e-12)
    return float(value)


def load_stats(counts: list) -> dict[str, float]:
    """Tokens per expert (one tensor per MoE layer) -> max/mean and min/mean load, averaged and worst layer."""
    if not counts:
        return {}
    ratios = [(c.max() / c.mean().clamp(min=1e-9)).item() for c in counts]
    mins = [(c.min() / c.mean().clamp(min=1e-9)).item() for c in counts]
    return {"moe/max_over_mean_load": sum(ratios) / len(ratios), "moe/worst_layer_max_over_mean": max(ratios),
            "moe/min_over_mean_load": sum(mins) / len(mins)}


def host_memory_gib() -> dict[str, float]:
    """Host memory of this rank: its peak resident set so far (a checkpoint save stages the rank's shard in host
    memory between two log steps) plus the pages only its data-loader workers hold (USS: a forked worker shares
    the rank's pages, which its RSS or PSS would count again); and the whole node's used memory. Issue 13's ranks
    killed at long context were these growing."""
    import resource

    import psutil

    rank = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    children = 0
    for child in psutil.Process().children(recursive=True):
        try:
            children += child.memory_full_info().uss
        except psutil.Error:  # a worker that just exited, or one we may not read
            pass
    # Apart too, and torch's pinned-host cache inside the rank's: that is what grew to 32 GiB per rank at 64k
    # (docs/log/benchmarks-2026-11-27-to-12-03.md, "Second run: where the host memory went").
    out = {"perf/host_rss_gib": (rank + children) / 2**30, "perf/host_rank_peak_gib": rank / 2**30,
           "perf/host_children_gib": children / 2**30, "perf/host_used_gib": psutil.virtual_memory().used / 2**30}
    import torch

    pinned = getattr(torch.cuda, "host_memory_stats", None)
    if torch.cuda.is_initialized() and pinned is not None:  # torch's pinned-host cache (blocks rounded up to 2^k)
        out["perf/host_pinned_gib"] = pinned().get("allocated_bytes.current", 0) / 2**30
    return out


def log_train_step(live, it: int, *, loss: float | None, lr: float, grad_norm: float | None,
                   tokens_per_s: float | None, world: int, flops: dict, memory_gib: float | None, load: dict,
                   label: str, reserved_gib: float | None = None, weight_decay: float | None = None,
                   host: dict[str, float] | None = None) -> None:
    """One training log row, the same keys whichever backend trained (so plots and tests compare them)."""
    live.step = it
    if loss is not None:
        live.log_metric("train/loss", loss)
    live.log_metric("train/lr", lr)
    if grad_norm is not None:
        live.log_metric("train/grad_norm", grad_norm)
    if tokens_per_s:
        live.log_metric("perf/tokens_per_s_per_gpu", tokens_per_s / world)
        live.log_metric("perf/tflops_per_gpu_true", tokens_per_s * flops["true"] / world / 1e12)
        live.log_metric("perf/tflops_per_gpu_bridge", tokens_per_s * flops["bridge"] / world / 1e12)
    if memory_gib is not None:
        live.log_metric("perf/max_memory_gib", memory_gib)  # peak of live tensors (what the plan estimates)
    if reserved_gib is not None:  # peak the caching allocator held: what must fit on the card, with CUDA's context
        live.log_metric("perf/max_memory_reserved_gib", reserved_gib)
    for name, value in {**load, **(host or {})}.items():
        live.log_metric(name, value)
    if weight_decay is not None:  # as the optimizer applied it in this step (effective.applied_weight_decay)
        live.log_metric("optim/weight_decay", weight_decay)
    live.log_metric("phase", label, plot=False)
    live.make_summary()


class LoadBalanceTracker:
    """Counts tokens per expert in every MoE router (forward hooks), reset at each read."""

    def __init__(self, model_chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, object] = {}
        self.handles = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._hook(len(self.handles))))

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            routing_map = output[1]
            counts = routing_map.sum(dim=0).float().detach()
            self.counts[layer] = counts if layer not in self.counts else self.counts[layer] + counts

        return hook

    def read(self) -> dict[str, float]:
        stats = load_stats(list(self.counts.values()))
        self.counts = {}
        return stats


class DvcliveCallback:
    """A Megatron-Bridge callback (duck-typed: Bridge calls the on_* methods it finds)."""

    def __init__(self, live_dir: str, stage_label: str, tokens_per_iter: int, flops_true: float, flops_bridge: float,
                 log_interval: int, extra: dict | None = None, last_iter: int | None = None):
        self.live_dir, self.stage_label = live_dir, stage_label
        self.tokens_per_iter, self.log_interval = tokens_per_iter, log_interval
        self.flops = {"true": flops_true, "bridge": flops_bridge}
        self.extra = extra or {}
        self.live = None
        self.tracker = None
        self.last = None  # (iteration, wall time) of the last log
        self.first_iter, self.last_iter = None, last_iter  # the phase's first step in this process, and its last
        self.weight_decay = None  # what the optimizer applies in the current step

    @staticmethod
    def _is_logging_rank() -> bool:
        import torch.distributed as dist

        return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1  # last pipeline stage

    def on_train_start(self, context) -> None:
        if not self._is_logging_rank():
            return
        from dvclive import Live

        step = context.state.train_state.step
        truncate_metrics(self.live_dir, step)
        self.live = Live(self.live_dir, resume=True, save_dvc_exp=False, dvcyaml=False, report=None)
        for key, value in self.extra.items():
            self.live.log_param(key, value)
        self.tracker = LoadBalanceTracker(context.model)
        self.last = (step, time.time())
        self.first_iter = step + 1

    def on_train_step_start(self, context) -> None:
        if self.live is not None:
            from nano3.train.effective import applied_weight_decay

            self.weight_decay = applied_weight_decay(context.optimizer.param_groups)

    def on_train_step_end(self, context) -> None:
        if self.live is None:
            return
        it = context.state.train_state.step + 1  # Bridge fires this before counting the finished step
        if it in (self.first_iter, self.last_iter) and it % self.log_interval:
            self.live.step = it  # the weight decay of the first and last step, whatever the log interval
            self.live.log_metric("optim/weight_decay", self.weight_decay)
            self.live.make_summary()
        if it % self.log_interval:
            return
        import torch.distributed as dist

        now = time.time()
        elapsed_iters, seconds = it - self.last[0], now - self.last[1]
        self.last = (it, now)
        import torch

        world = dist.get_world_size() if dist.is_initialized() else 1
        loss = (context.loss_dict or {}).get("lm loss")
        log_train_step(self.live, it, loss=scalar(loss) if loss is not None else None,
                       lr=float(context.optimizer.param_groups[0]["lr"]),
                       grad_norm=float(context.grad_norm) if context.grad_norm is not None else None,
                       tokens_per_s=elapsed_iters * self.tokens_per_iter / seconds if seconds > 0 else None,
                       world=world, flops=self.flops, memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                       load=self.tracker.read(), label=self.stage_label,
                       reserved_gib=torch.cuda.max_memory_reserved() / 2**30, weight_decay=self.weight_decay,
                       host=host_memory_gib())

    def on_eval_end(self, context) -> None:
        if self.live is None or not context.total_loss_dict:
            return
        loss = context.total_loss_dict.get("lm loss")
        if loss is not None:
            self.live.step = context.state.train_state.step
            self.live.log_metric("valid/loss", scalar(loss))
            self.live.make_summary()

    def on_train_end(self, context) -> None:
        if self.live is not None:
            self.live.make_summary()
            self.live.end()


def read_metric(live_dir: Path, name: str) -> list[tuple[int, float]]:
    path = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return []
    with open(path) as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]
