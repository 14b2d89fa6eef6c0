"""CPU reference backend (`train.backend: reference`, or `auto` on a machine without a CUDA GPU).

It exists so `make smoke` trains end to end anywhere and CI runs every stage; the Megatron backend
stays the engine. It trains tiny presets with transformers' NemotronH on the CPU and keeps the
contract of the Megatron path: the same blends read through megatron-core's BlendedMegatronDatasetBuilder
(sample i of a phase is the same sample Megatron would draw at consumed-samples i), the same plan
(iterations, phase switch, WSD learning rate from schedule.py), the same dvclive keys, and the same
run-directory convention (iter_XXXXXXX + latest_checkpointed_iteration.txt), in Hugging Face format.

Differences from Megatron, by design: FP32 on CPU, PyTorch Mamba kernels (chunk 32: the same SSD
result, four times less work on CPU than 128), a fixed validation set, and no sequence aux loss (the
aux-loss-free expert-bias balancing is kept). Its token budget is `train.reference` / `lc.reference`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from nano3.config import section_name
from nano3.config.sections import Mix
from nano3.data.lc_mix import is_short
from nano3.data.tokenizers import read_info
from nano3.errors import UserError
from nano3.files import atomic_dir
from nano3.schedule import PhasePlan
from nano3.train import rundir
from nano3.train.stopping import STOP_FILE_ENV, ignore_stop_signals, stop_requested

MAX_PARAMS = 100e6  # the reference trains tiny presets; anything larger belongs on GPUs


class ExpertLoad:
    """Counts tokens per expert in every MoE layer (for the load metrics) and applies megatron-core's
    aux-loss-free balancing after each step: each expert's bias moves by the rate toward the mean load."""

    def __init__(self, model, bias_update_rate: float):
        import torch

        self.rate = bias_update_rate
        self.layers = [m for m in model.modules() if type(m).__name__ == "NemotronHMoE"]
        self.step_counts = [torch.zeros(m.n_routed_experts) for m in self.layers]
        self.log_counts = [torch.zeros(m.n_routed_experts) for m in self.layers]
        for i, layer in enumerate(self.layers):
            layer.route_tokens_to_experts = self._counting(layer.route_tokens_to_experts, i)

    def _counting(self, route, i):
        import torch

        def wrapped(router_logits):
            indices, weights = route(router_logits)
            counts = torch.bincount(indices.flatten(), minlength=len(self.step_counts[i])).float()
            self.step_counts[i] += counts
            self.log_counts[i] += counts
            return indices, weights

        return wrapped

    def update_biases(self) -> None:
        import torch

        with torch.no_grad():
            for layer, counts in zip(self.layers, self.step_counts):
                bias = layer.gate.e_score_correction_bias
                bias += self.rate * torch.sign(counts.mean() - counts)
                counts.zero_()

    def read(self) -> dict[str, float]:
        from nano3.train.metrics import load_stats

        stats = load_stats([c.clone() for c in self.log_counts])
        for c in self.log_counts:
            c.zero_()
        return stats


def build_model(params, plan, init_from: Path | None):
    import torch
    from transformers import AutoModelForCausalLM

    from nano3.model.hf import nemotron_h_config, use_cpu_mamba_chunks

    if plan.params_total > MAX_PARAMS:
        raise UserError(f"{params.source}: model.preset={plan.preset_name} has {plan.params_total / 1e9:.1f}B "
                        f"parameters; the CPU reference backend trains tiny presets only (set train.backend=megatron "
                        f"and run on GPUs)")
    torch.manual_seed(params.settings.train.seed)
    if init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    else:
        info = read_info(params.settings.tokenizer.dir)
        positions = max(params.settings.train.seq_length, params.settings.lc.seq_length)
        config = nemotron_h_config(plan.preset, plan.vocab, info.eod_id, positions, dtype="float32")
        model = AutoModelForCausalLM.from_config(config)
    use_cpu_mamba_chunks(model)
    return model


def build_optimizer(model, params, lr: float):
    """AdamW as Megatron sets it up: no weight decay on biases and other 1-D parameters (norms, A_log, D)."""
    import torch

    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    cfg = params.settings
    return torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg.train.weight_decay)},
                              {"params": rest, "weight_decay": 0.0}], lr=lr,
                             betas=(float(cfg.train.adam_beta1), float(cfg.train.adam_beta2)),
                             eps=float(cfg.train.adam_eps))


def dataset_blend(dataset):
    """(prefixes, weights) of a megatron-core dataset: a BlendedDataset's parts, or one GPTDataset."""
    if dataset is None:
        return None
    if hasattr(dataset, "datasets"):
        return [d.dataset_path for d in dataset.datasets], list(dataset.weights)
    return [dataset.dataset_path], [1.0]


def effective_config(params, phase: PhasePlan, model, optimizer, schedule, load: ExpertLoad, train_set,
                     valid_set, sizes: list[int]) -> dict:
    """The effective configuration (effective.py) from the reference backend's own objects."""
    from nano3.train.effective import applied_weight_decay, blend_shares, read_groups, summarize_groups

    cfg = params.settings
    groups = read_groups(optimizer.param_groups)
    config = model.config
    return {
        "backend": "reference", "phase": phase.name, "source": "live objects at start-up (CPU reference backend)",
        "optimizer": {**summarize_groups(groups), "clip_grad": float(cfg.train.clip_grad), "groups": groups},
        "weight_decay_applied": {"first_step": applied_weight_decay(optimizer.param_groups)},
        "scheduler": {"max_lr": schedule.lr, "min_lr": schedule.min_lr, "lr_warmup_init": schedule.warmup_init,
                      "warmup_iters": schedule.warmup_iters, "decay_iters": schedule.decay_iters,
                      "decay_style": schedule.style,
                      **({"wsd_decay_style": schedule.wsd_decay_style,
                          "wsd_decay_iters": schedule.decay_iters - schedule.decay_start_iter}
                         if schedule.style == "WSD" else {}),
                      # torch's AdamW keeps each group's weight decay; nothing schedules it
                      "start_weight_decay": optimizer.param_groups[0]["weight_decay"],
                      "end_weight_decay": optimizer.param_groups[0]["weight_decay"],
                      "weight_decay_incr_style": "constant"},
        "precision": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parallel": {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1, "dp": 1, "world": 1, "sequence_parallel": False},
        "batch": {"seq_length": len(train_set[0]["tokens"]), "global_batch_size": phase.global_batch_size,
                  "micro_batch_size": (cfg.lc if phase.name == "lc" else cfg.train).micro_batch_size,
                  "train_iters": phase.train_iters},
        "vocab": {"tokenizer": read_info(cfg.tokenizer.dir).vocab_size,
                  "model": int(model.get_input_embeddings().weight.shape[0])},
        "moe": {"num_experts": config.n_routed_experts, "topk": config.num_experts_per_tok,
                "score_function": "sigmoid",  # transformers' NemotronH router
                "topk_scaling_factor": config.routed_scaling_factor,
                "expert_bias": bool(load.layers) and all(hasattr(m.gate, "e_score_correction_bias") for m in load.layers),
                "bias_update_rate": load.rate, "aux_loss_type": "none", "aux_loss_coeff": 0.0},
        "init_std": config.initializer_range,
        "data": {"seed": cfg.train.seed,
                 "blend": blend_shares([dataset_blend(train_set), dataset_blend(valid_set)]),
                 "train_samples": sizes[0], "valid_samples": sizes[1] if valid_set is not None else 0,
                 "sample_offset": phase.sample_offset},
    }


def save_checkpoint(run_dir: Path, iteration: int, model, optimizer, keep: int = -1) -> None:
    """Save, point the tracker at it, then drop all but the `keep` newest (-1: keep all), as Bridge's most_recent_k."""
    import shutil

    import torch

    with atomic_dir(rundir.iteration_dir(run_dir, iteration)) as tmp:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    rundir.mark_latest(run_dir, iteration)
    if keep > 0:
        for old in rundir.iteration_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)


def phase_sizes(params, phase: PhasePlan) -> list[int]:
    """Train/valid/test samples the phase reads, as Megatron-Bridge requests them for the same phase."""
    from nano3.data.megatron import split_sizes

    cfg = params.settings
    return split_sizes(phase, cfg.train.eval_interval, cfg.train.eval_iters)


def phase_datasets(params, phase: PhasePlan, cache_dir: Path, sizes: list[int]):
    from nano3.data.megatron import build_phase_datasets, megatron_tokenizer

    cfg = params.settings
    tokenizer_dir = cfg.tokenizer.dir
    blend = Path(cfg.blend.out_dir) / f"{phase.blend}.json"
    return build_phase_datasets(blend, seq_length=phase.seq_length, seed=cfg.train.seed, sizes=sizes,
                                tokenizer=megatron_tokenizer(tokenizer_dir, read_info(tokenizer_dir)),
                                cache_dir=cache_dir)


def batch_loss(model, samples: list[dict]):
    """Mean next-token loss over the loss-masked tokens of a micro-batch of GPTDataset samples."""
    import torch
    import torch.nn.functional as F

    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
    logits = model(input_ids=tokens).logits.float()
    losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none")
    return (losses * mask.view(-1)).sum() / mask.sum().clamp(min=1)


def short_rows(sample: dict, length: int) -> list[dict]:
    """A long sample as independent sequences of `length` tokens: the same tokens and targets, each piece seen
    without the context before it (packed sequences with the state restarting at every boundary)."""
    import torch

    pieces = {k: torch.as_tensor(sample[k]).reshape(-1, length) for k in ("tokens", "labels", "loss_mask")}
    return [{k: v[i] for k, v in pieces.items()} for i in range(pieces["tokens"].shape[0])]


def micro_batch_groups(samples: list[dict], first_index: int, mix) -> list[tuple[list[dict], int]]:
    """(rows, samples they stand for) of one micro-batch: long samples together, each short one as its pieces."""
    if not mix.short_share:
        return [(samples, len(samples))]
    short = [is_short(first_index + i, mix.short_share) for i in range(len(samples))]
    groups = [(short_rows(s, mix.short_length), 1) for s, cut in zip(samples, short) if cut]
    long = [s for s, cut in zip(samples, short) if not cut]
    return ([(long, len(long))] if long else []) + groups


def train_reference(params, plan, stage: str, phases: list[PhasePlan], run_dir: Path, live_dir: Path,
                    pretrained: str | None, specs: dict[str, Path], log=print) -> None:
    """Run the stage's phases in this process; SIGTERM, Ctrl-C or the job's stop request (nano3.train.stopping)
    checkpoints after the step and stops (the caller resumes later); a second Ctrl-C stops at once."""
    import torch
    from dvclive import Live
    from tqdm import tqdm

    from nano3.train import effective
    from nano3.train.conform import assert_run_conforms
    from nano3.train.mapping import keep_checkpoints
    from nano3.train.metrics import host_memory_gib, log_train_step, truncate_metrics
    from nano3.train.rundir import iteration_dir, latest_iteration
    from nano3.train.spec import read as read_spec

    torch.set_num_threads(os.cpu_count() or 1)
    section = section_name(stage)
    schedule = plan.schedule.pretrain_lr if stage == "pretrain" else plan.schedule.lc_lr
    cfg = params.settings
    done = latest_iteration(run_dir)
    init = iteration_dir(run_dir, done) if done else (iteration_dir(pretrained, latest_iteration(pretrained))
                                                      if pretrained else None)
    model = build_model(params, plan, init)
    optimizer = build_optimizer(model, params, schedule.lr_at(max(done, 1)))
    if done:
        state = torch.load(iteration_dir(run_dir, done) / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    load = ExpertLoad(model, plan.preset.moe_router_bias_update_rate)
    truncate_metrics(live_dir, done)
    live = Live(str(live_dir), resume=True, save_dvc_exp=False, dvcyaml=False, report=None)
    live.log_param("backend", "reference")
    stop = {"by": None}

    def request_stop(signum, _frame):
        if stop["by"] and signum == signal.SIGINT:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        stop["by"] = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    mbs, clip = cfg.training(stage).micro_batch_size, float(cfg.train.clip_grad)
    mix = cfg.lc.mix if stage == "lc" else Mix()
    log_interval, eval_interval = cfg.train.log_interval, cfg.train.eval_interval
    save_interval = cfg.train.save_interval
    flops = {"true": plan.stages[section].flops_per_token_true, "bridge": plan.stages[section].flops_per_token_bridge}
    try:
        for phase in phases:
            if done >= phase.end_iter:
                continue
            sizes = phase_sizes(params, phase)
            train_set, valid_set, _ = phase_datasets(params, phase, run_dir / "dataset_cache", sizes)
            doc = effective_config(params, phase, model, optimizer, schedule, load, train_set, valid_set, sizes)
            effective.write(run_dir, phase.name, doc)
            assert_run_conforms(doc, read_spec(specs[phase.name]), str(effective.effective_path(run_dir, phase.name)))
            first = max(done, phase.start_iter) + 1
            gbs = phase.global_batch_size
            steps = range(max(done, phase.start_iter), phase.end_iter)
            bar = tqdm(steps, desc=f"{stage} {phase.name}", unit="it")
            last = (done, time.time())
            for step, batch in zip(bar, step_batches(train_set, phase, steps, cfg.train.num_workers, log)):
                it = step + 1
                for group in optimizer.param_groups:
                    group["lr"] = schedule.lr_at(it)
                weight_decay = effective.applied_weight_decay(optimizer.param_groups)
                if it == phase.end_iter:
                    doc["weight_decay_applied"].update(last_step=weight_decay, last_iteration=it)
                    effective.write(run_dir, phase.name, doc)
                model.train()
                total = 0.0
                offset = (step - phase.start_iter) * gbs  # the phase's dataset holds only what it reads
                for start in range(0, gbs, mbs):
                    samples = batch[start:start + mbs]
                    for rows, count in micro_batch_groups(samples, offset + start, mix):
                        loss = batch_loss(model, rows) * count / gbs  # every sample weighs its tokens alike
                        loss.backward()
                        total += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                load.update_biases()
                bar.set_postfix(loss=f"{total:.3f}")
                if it % log_interval == 0 or it == phase.end_iter:
                    seconds = time.time() - last[1]
                    log_train_step(live, it, loss=total, lr=schedule.lr_at(it), grad_norm=grad_norm,
                                   tokens_per_s=(it - last[0]) * gbs * phase.seq_length / seconds, world=1,
                                   flops=flops, memory_gib=None, load=load.read(), label=phase.name,
                                   weight_decay=weight_decay, host=host_memory_gib())
                    last = (it, time.time())
                elif it == first:
                    live.step = it
                    live.log_metric("optim/weight_decay", weight_decay)
                if valid_set is not None and (it % eval_interval == 0 or it == phase.end_iter):
                    live.log_metric("valid/loss", validate(model, valid_set, cfg.train.eval_iters * gbs, mbs))
                    if stage == "lc" and phase.seq_length % cfg.lc.mix.short_length == 0:
                        live.log_metric("valid/loss_short", validate(model, valid_set, cfg.train.eval_iters * gbs,
                                                                     mbs, cfg.lc.mix.short_length))
                    live.make_summary()
                if not stop["by"] and stop_requested():
                    stop["by"] = f"the job's stop request ({STOP_FILE_ENV})"
                if it % save_interval == 0 or it == phase.end_iter or stop["by"]:
                    save_checkpoint(run_dir, it, model, optimizer, keep_checkpoints(params.settings.train))
                    done = it
                if stop["by"]:
                    log(f"{stage}: stopped by {stop['by']} at iteration {it} (checkpoint saved)")
                    return
            done = phase.end_iter
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        live.end()


class StepBatches:
    """A phase's training samples as global batches: item k is the batch of step `steps[k]`, read by DataLoader
    workers as Megatron's ranks read theirs (so the CPU run has the processes a Slurm signal reaches)."""

    def __init__(self, train_set, phase: PhasePlan, steps: range):
        self.train_set, self.phase, self.steps = train_set, phase, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> list[dict]:
        gbs = self.phase.global_batch_size
        offset = (self.steps[k] - self.phase.start_iter) * gbs
        return [self.train_set[offset + i] for i in range(gbs)]


def step_batches(train_set, phase: PhasePlan, steps: range, workers: int, log):
    """The batches of `steps` in order, from `workers` DataLoader processes (train.num_workers; 0: this one)."""
    from torch.utils.data import DataLoader

    if workers:
        log(f"data loader: {workers} worker processes")
    return DataLoader(StepBatches(train_set, phase, steps), batch_size=None, num_workers=workers,
                      worker_init_fn=ignore_stop_signals if workers else None)


def validate(model, valid_set, samples: int, mbs: int, short_length: int | None = None) -> float:
    """Validation loss over the first `samples`; with `short_length`, of the same tokens cut into sequences of that
    length (lc's short-context loss: what mixing short sequences into lc is meant to keep)."""
    import torch

    model.eval()
    n = min(samples, len(valid_set))
    losses = []
    with torch.no_grad():
        for i in range(0, n, mbs):
            batch = [valid_set[j] for j in range(i, min(i + mbs, n))]
            rows = [r for s in batch for r in short_rows(s, short_length)] if short_length else batch
            losses.append(batch_loss(model, rows).item() * len(batch))
    return sum(losses) / max(n, 1)


def train(run, log=print) -> None:
    """The reference backend behind nano3.train.backends.train_on."""
    train_reference(run.params, run.plan, run.stage, run.phases, run.run_dir, run.live_dir, run.pretrained, run.specs,
                    log)
