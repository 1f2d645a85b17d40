"""TrainingMonitor: logs the gradient norm and the training throughput, the curves `embedscale report` draws.

- `train/grad_norm`: L2 norm of all gradients, in `on_before_optimizer_step` -- after DDP's all-reduce
  (so every rank sees the global gradient) and, with automatic optimisation, before clipping: a norm
  pinned at `trainer.gradient_clip_val` means clipping is active. With GradCache, which clips inside
  its own step, the logged norm is the clipped one. Under sharded strategies (FSDP, DeepSpeed) a rank
  holds a shard of the gradient, or none, so nothing is logged there (said once in the log).
- `train/samples_per_second`: queries per second over all ranks, timed from the start to the end of a
  training batch (forward, backward, optimizer step; data loading and the evaluations run by
  EvalCallback are not counted, so the curve stays comparable across eval settings).
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger(__name__)


class TrainingMonitor(L.Callback):
    def __init__(self) -> None:
        self._batch_start: float | None = None
        self._warned = False

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._batch_start is None:
            return
        seconds = time.perf_counter() - self._batch_start
        samples = getattr(batch, "batch_size", 0) * trainer.world_size
        if samples and seconds > 0:
            module.log("train/samples_per_second", samples / seconds, batch_size=samples)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            if not self._warned:
                log.info("train/grad_norm is not logged under %s (each rank holds a shard of the gradient)", name)
                self._warned = True
            return
        grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            module.log("train/grad_norm", norm)
