"""AdamW with decoupled weight decay on matrices only, and warmup + linear/cosine/constant decay.

Biases, norm weights (every parameter with fewer than 2 dims) and the temperature get no weight
decay: decaying a LayerNorm gain towards 0 or the temperature towards 1 is never what one wants.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from embedscale.config import OptimConfig, Scheduler


def param_groups(model: nn.Module, cfg: OptimConfig, *, temperature: nn.Parameter | None = None) -> list[dict]:
    decay, no_decay = [], []
    special = {id(temperature)} if temperature is not None else set()
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen or id(param) in special:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if temperature is not None and temperature.requires_grad:
        lr = cfg.temperature_lr if cfg.temperature_lr is not None else cfg.lr
        groups.append({"params": [temperature], "weight_decay": 0.0, "lr": lr, "name": "temperature"})
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: OptimConfig, num_training_steps: int):
    """Multiplier of the base lr at optimizer step s: linear warmup, then the configured decay to 0."""
    # warmup_ratio rounds up, as transformers' Trainer does (84 steps x 0.1 -> 9 warmup steps); 1e-9 keeps
    # float error from adding one (90 x 0.1 = 9.000000000000002 -> 9)
    ratio_steps = math.ceil(cfg.warmup_ratio * num_training_steps - 1e-9)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else ratio_steps

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)  # as transformers does: lr 0 at step 0
        if cfg.scheduler is Scheduler.constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
        if cfg.scheduler is Scheduler.cosine:
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, num_training_steps: int, temperature: nn.Parameter | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg, temperature=temperature), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, num_training_steps))
    return optimizer, scheduler
