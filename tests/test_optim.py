"""Optimizer groups and the learning-rate schedule."""

import pytest
import torch
from torch import nn

from embedscale.config import OptimConfig, Scheduler
from embedscale.contrastive.optim import build_optimizer, lr_lambda


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    temp = nn.Parameter(torch.tensor(3.0))
    opt, _ = build_optimizer(
        model, OptimConfig(weight_decay=0.1, temperature_lr=1e-3), num_training_steps=10, temperature=temp
    )
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and all(p.ndim == 2 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0 and len(groups["no_decay"]["params"]) == 4
    assert groups["temperature"]["params"] == [temp] and groups["temperature"]["weight_decay"] == 0.0
    assert groups["temperature"]["initial_lr"] == 1e-3  # LambdaLR scales "lr" (0 at step 0)


@pytest.mark.parametrize("scheduler", list(Scheduler))
def test_schedule_warms_up_then_decays(scheduler):
    fn = lr_lambda(OptimConfig(scheduler=scheduler, warmup_steps=10), 110)
    assert fn(0) == 0.0 and fn(5) == pytest.approx(0.5) and fn(10) == pytest.approx(1.0)
    if scheduler is Scheduler.constant:
        assert fn(109) == 1.0
    else:
        assert fn(60) == pytest.approx(0.5, abs=1e-9) and fn(110) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ratio_rounds_up_like_transformers():
    for steps, warmup in ((84, 9), (90, 9), (10, 1), (5, 1)):
        fn = lr_lambda(OptimConfig(warmup_ratio=0.1), steps)
        assert fn(warmup - 1) < 1.0 and fn(warmup) == pytest.approx(1.0), (steps, warmup)
