"""The warmup + cosine-to-final learning-rate schedule of the reference recipe (docs/architecture.md), against
its closed form."""

import math

import pytest
import torch

from sidewalk_hf.training.schedule import build_lr_scheduler

BASE_LR, FINAL_LR, MAX_ITER, WARMUP, FACTOR = 1e-3, 1e-4, 100_000, 1000, 1e-3


def closed_form(i: int) -> float:
    e = FINAL_LR / BASE_LR

    def c(j):
        return e + 0.5 * (1 - e) * (1 + math.cos(math.pi * j / MAX_ITER))

    m = c(i) if i >= WARMUP else FACTOR + (c(WARMUP) - FACTOR) * i / WARMUP
    return BASE_LR * m


def lr_at(iterations):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = build_lr_scheduler(
        optimizer,
        base_lr=BASE_LR,
        final_lr=FINAL_LR,
        max_iter=MAX_ITER,
        warmup_iters=WARMUP,
        warmup_factor=FACTOR,
    )
    wanted, found, i = sorted(iterations), {}, 0
    for target in wanted:
        while i < target:
            optimizer.step()
            scheduler.step()
            i += 1
        found[target] = optimizer.param_groups[0]["lr"]
    return found


def test_schedule_matches_closed_form_at_key_iterations():
    found = lr_at([0, 999, 1000, 50_000, 100_000])
    for i, lr in found.items():
        assert lr == pytest.approx(closed_form(i), rel=1e-9), i
    assert found[0] == pytest.approx(1e-6)
    assert found[50_000] == pytest.approx(5.5e-4)
    assert found[100_000] == pytest.approx(1e-4)


def test_warmup_is_linear_and_continuous_with_the_cosine():
    found = lr_at([0, 500, 999, 1000, 1001])
    assert found[500] == pytest.approx((found[0] + closed_form(1000)) / 2, rel=1e-9)
    assert found[999] < found[1000]
    assert found[1001] < found[1000]


def test_final_lr_above_base_lr_is_rejected():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="FINAL_LR"):
        build_lr_scheduler(
            optimizer, base_lr=1e-3, final_lr=1e-2, max_iter=10, warmup_iters=1, warmup_factor=0.1
        )
