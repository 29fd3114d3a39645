"""Detectron2's ``WarmupCosineLR`` with a final learning rate, as a plain ``LambdaLR``.

lr(i) = BASE_LR * m(i), i counted from 0 (the iteration the optimizer step belongs to):
c(i) = e + (1 - e) * (1 + cos(pi * i / MAX_ITER)) / 2 with e = FINAL_LR / BASE_LR (the cosine runs over
the whole run, not re-based after warm-up), m(i) = c(i) for i >= WARMUP_ITERS, and during warm-up a
linear ramp from WARMUP_FACTOR to c(WARMUP_ITERS).
"""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine_multiplier(
    iteration: int, *, max_iter: int, warmup_iters: int, warmup_factor: float, final_lr_ratio: float
) -> float:
    def cosine(i: int) -> float:
        progress = min(i, max_iter) / max_iter
        return final_lr_ratio + 0.5 * (1.0 - final_lr_ratio) * (1.0 + math.cos(math.pi * progress))

    if iteration >= warmup_iters:
        return cosine(iteration)
    return warmup_factor + (cosine(warmup_iters) - warmup_factor) * iteration / warmup_iters


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    base_lr: float,
    final_lr: float,
    max_iter: int,
    warmup_iters: int,
    warmup_factor: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step; ``optimizer`` must have been built with ``base_lr``."""
    if not 0.0 <= final_lr <= base_lr:
        raise ValueError(f"SOLVER.FINAL_LR must lie in [0, SOLVER.BASE_LR={base_lr}], got {final_lr}")
    multiplier = partial(
        warmup_cosine_multiplier,
        max_iter=max_iter,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
        final_lr_ratio=final_lr / base_lr if base_lr else 0.0,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
