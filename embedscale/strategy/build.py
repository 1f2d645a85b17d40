"""Build the Lightning strategy of a run and pick its step driver: the only place that maps a strategy name to
code. `trainer.strategy` auto/ddp/ddp_spawn go to Lightning by name; fsdp2 and deepspeed are built here
(fsdp2.py, deepspeed.py). At run time `driver_for` reads the live Lightning strategy -- `auto` may have become
DDP on several devices -- and returns its StepDriver (base.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from embedscale.config import Strategy, TrainerConfig
from embedscale.strategy.base import DDPDriver, StepDriver, max_grad_norm


def build_strategy(cfg: TrainerConfig, *, gradcache: bool = False) -> Any:
    """What `L.Trainer(strategy=...)` takes: a strategy object whose process group waits at most
    trainer.collective_timeout in a collective, or the name `auto` for one process."""
    timeout = timedelta(seconds=cfg.collective_timeout)
    if cfg.strategy == Strategy.fsdp2:
        from embedscale.strategy.fsdp2 import fsdp2_strategy

        return fsdp2_strategy(
            max_norm=max_grad_norm(cfg), reshard_after_forward=cfg.reshard_after_forward, timeout=timeout
        )
    if cfg.strategy == Strategy.deepspeed:
        from embedscale.strategy.deepspeed import deepspeed_strategy

        return deepspeed_strategy(cfg, gradcache=gradcache, timeout=timeout)
    if cfg.strategy == Strategy.auto and cfg.world_size() == 1:
        return "auto"  # one process: Lightning's single-device strategy, no process group
    from lightning.pytorch.strategies import DDPStrategy

    start = "spawn" if cfg.strategy == Strategy.ddp_spawn else "popen"
    return DDPStrategy(start_method=start, timeout=timeout)


def driver_for(strategy, cfg: TrainerConfig | None) -> StepDriver:
    """The step driver of a live Lightning strategy (our sharded strategies carry their own)."""
    own = getattr(strategy, "embedscale_driver", None)
    if own is not None:
        return own()
    max_norm = max_grad_norm(cfg) if cfg is not None else 0.0
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        return DDPDriver(max_norm=max_norm)
    return StepDriver(max_norm=max_norm)


def after_fit_callbacks(cfg: TrainerConfig, model_cfg) -> list:
    """Callbacks a sharded run needs: after fit, plain backbones holding the trained weights (for export and
    evaluation), on every rank."""
    if cfg.strategy not in (Strategy.fsdp2, Strategy.deepspeed):
        return []
    import lightning as L

    if cfg.strategy == Strategy.fsdp2:
        from embedscale.strategy.fsdp2 import unshard_for_export as plain_backbones
    else:
        from embedscale.strategy.deepspeed import consolidate_for_export as plain_backbones

    class PlainBackbonesAfterFit(L.Callback):
        def on_fit_end(self, trainer, module) -> None:
            plain_backbones(module, model_cfg)

    return [PlainBackbonesAfterFit()]


def check_resume(cfg: TrainerConfig, checkpoint: str) -> None:
    """Refuse (ValueError) a checkpoint written under another strategy before anything reads it."""
    from embedscale.checkpoints import check_resume_path

    check_resume_path(cfg, checkpoint)


def adopt_backbones(encoder, plain) -> None:
    """Give `encoder` the plain backbones of a fresh `plain` encoder (in the encoder's train/eval mode)."""
    plain.train(encoder.training)
    encoder.query_backbone = plain.query_backbone
    encoder.document_backbone = plain.document_backbone
