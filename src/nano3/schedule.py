"""Token budgets -> iterations, the phase switch and the learning-rate curve, in plain Python.

The two-phase curriculum is one logical run of `iterations` steps: phase 1 stops at `switch_iter`
and phase 2 resumes its checkpoint with the phase-2 blend, both built with the same `train_iters`
so Megatron's scheduler draws one continuous Warmup-Stable-Decay curve across the switch.
`lr_at` reproduces megatron-core's OptimizerParamScheduler so the plan can be checked against the
LR that training logs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nano3.config.sections import Settings
from nano3.errors import UserError

WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass(frozen=True)
class PhasePlan:
    name: str  # phase1 | phase2 | lc
    blend: str  # which blend file the phase reads
    start_iter: int  # first iteration of the phase is start_iter + 1
    end_iter: int  # the phase's last iteration (exit_interval for phase 1)
    train_iters: int  # what Megatron is told the run length is (for the schedule and dataset sizes)
    seq_length: int
    global_batch_size: int

    @property
    def iterations(self) -> int:
        return self.end_iter - self.start_iter

    @property
    def tokens(self) -> int:
        return self.iterations * self.global_batch_size * self.seq_length

    @property
    def samples(self) -> int:
        """Training samples the phase reads: its dataset index is built for these and no more."""
        return self.iterations * self.global_batch_size

    @property
    def sample_offset(self) -> int:
        """Samples consumed before the phase starts (Megatron's consumed_train_samples when it resumes)."""
        return self.start_iter * self.global_batch_size

    @property
    def exit_interval(self) -> int | None:
        """Where Megatron must stop before its `train_iters` (phase 1 of the curriculum), else None."""
        return self.end_iter if self.end_iter < self.train_iters else None


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_iters: int
    decay_start_iter: int  # last iteration at peak LR
    decay_iters: int  # = train_iters: the LR reaches min_lr here
    style: str  # "WSD" or "constant"
    wsd_decay_style: str = "linear"
    warmup_init: float = 0.0  # the LR warm-up starts from (Bridge's scheduler.lr_warmup_init)

    def lr_at(self, iteration: int) -> float:
        """The LR megatron-core reports after `iteration` optimizer steps (its formula, in iterations)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.warmup_init + (self.lr - self.warmup_init) * iteration / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if iteration > self.decay_iters:
            return self.min_lr
        wsd_steps = self.decay_iters - self.decay_start_iter
        if iteration <= self.decay_start_iter or wsd_steps <= 0:
            coeff = 1.0
        else:
            ratio = (iteration - self.decay_start_iter) / wsd_steps
            coeff = {"linear": 1.0 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0),
                     "exponential": 2.0 * 0.5**ratio - 1.0, "minus_sqrt": 1.0 - math.sqrt(ratio)}[self.wsd_decay_style]
        return self.min_lr + coeff * (self.lr - self.min_lr)


@dataclass(frozen=True)
class TrainingSchedule:
    pretrain_iters: int
    switch_iter: int
    lc_iters: int
    phases: tuple[PhasePlan, ...]
    pretrain_lr: LRSchedule
    lc_lr: LRSchedule

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.name == name)

    def as_dict(self) -> dict:
        return {"pretrain_iters": self.pretrain_iters, "switch_iter": self.switch_iter, "lc_iters": self.lc_iters,
                "phases": [asdict(p) | {"tokens": p.tokens} for p in self.phases],
                "pretrain_lr": asdict(self.pretrain_lr), "lc_lr": asdict(self.lc_lr)}


def _iterations(tokens: float, gbs: int, seq: int, key: str) -> int:
    iters = round(float(tokens) / (gbs * seq))
    if iters < 1:
        raise UserError(f"{key}={tokens:g} tokens is less than one batch ({gbs} x {seq}); raise it")
    return iters


def build_schedule(cfg: Settings) -> TrainingSchedule:
    """Both training stages' iterations, phases and LR from `cfg.train` and `cfg.lc` (ranges: the typed sections)."""
    seq, gbs = cfg.train.seq_length, cfg.train.global_batch_size
    iters = _iterations(cfg.train.tokens, gbs, seq, "train.tokens")
    switch = min(iters, max(1, round(iters * float(cfg.train.phase2_start))))
    decay_start_fraction = float(cfg.train.decay_start)
    warmup = round(iters * float(cfg.train.warmup_fraction))
    style = cfg.train.decay_style
    pretrain_lr = LRSchedule(lr=float(cfg.train.lr), min_lr=float(cfg.train.min_lr), warmup_iters=warmup,
                             decay_start_iter=max(warmup, round(iters * decay_start_fraction)), decay_iters=iters,
                             style="WSD", wsd_decay_style=style)

    lc_seq, lc_gbs = cfg.lc.seq_length, cfg.lc.global_batch_size
    lc_iters = _iterations(cfg.lc.tokens, lc_gbs, lc_seq, "lc.tokens")
    lc_lr = LRSchedule(lr=float(cfg.lc.lr), min_lr=float(cfg.lc.lr), warmup_iters=0, decay_start_iter=lc_iters,
                       decay_iters=lc_iters, style="constant")
    phases = [PhasePlan("phase1", "phase1", 0, switch, iters, seq, gbs)]
    if switch < iters:
        phases.append(PhasePlan("phase2", "phase2", switch, iters, iters, seq, gbs))
    # LC starts from the pretrained weights as a new run (its own iteration count, data and constant LR).
    phases.append(PhasePlan("lc", "lc", 0, lc_iters, lc_iters, lc_seq, lc_gbs))
    return TrainingSchedule(iters, switch, lc_iters, tuple(phases), pretrain_lr, lc_lr)
