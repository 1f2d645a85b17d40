"""TrainingMonitor: logs the gradient norm and the training throughput, the curves `embedscale report` draws.

- `train/grad_norm`: L2 norm of all gradients, in `on_before_optimizer_step` -- after DDP's all-reduce
  (so every rank sees the global gradient) and, with automatic optimisation, before clipping: a norm
  pinned at `trainer.gradient_clip_val` means clipping is active. With GradCache, which clips inside
  its own step, the logged norm is the clipped one. Where a rank holds a shard of the gradient, or none
  (the step driver's `shards_gradients`), nothing is logged (said once in the log).
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
        driver = getattr(module, "driver", None)
        if driver is not None and driver.shards_gradients:
            if not self._warned:
                log.info(
                    "train/grad_norm is not logged under %s (each rank holds a shard of the gradient)",
                    type(trainer.strategy).__name__,
                )
                self._warned = True
            return
        grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            module.log("train/grad_norm", norm)


def _peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, the peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _batch_tokens(batch) -> int:
    """Real (unpadded) tokens of a batch's texts: queries and documents of a PairBatch, pairs of a re-ranker's."""
    total = 0
    for name in ("queries", "documents", "tokens"):
        tokens = getattr(batch, name, None)
        if isinstance(tokens, dict) and "attention_mask" in tokens:
            total += int(tokens["attention_mask"].sum())
    return total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines(L.Callback):
    """Plain progress lines for consoles that are not terminals (SLURM output files, `> train.log`), where a
    live progress bar prints nothing until the epoch ends. Rank 0 logs one line every `every_n_steps` optimizer
    steps or `every_seconds` seconds, whichever comes first, and at the last step:

        step 20/84 (24%) | epoch 1/3 | loss 0.4123 | lr 9.10e-05 | 12.3 pairs/s | 3,100 tokens/s | eta 0:05:12
        | peak mem 1.94 GiB   (one line)

    pairs/s counts queries over all ranks; tokens/s is this rank's real (unpadded) tokens x the world size. Both
    are averaged since the previous line over the time from each training batch's start to its end (forward,
    backward, optimizer step), as train/samples_per_second is; the ETA extrapolates the mean of that step time
    since training began (data loading and evaluations not counted). Put this callback before EvalCallback so
    that an evaluation at the end of a step is not timed as training."""

    def __init__(self, *, every_n_steps: int, every_seconds: float) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.every_seconds = every_seconds
        self._last_time: float | None = None
        self._train_seconds = 0.0
        self._steps_timed = 0
        self._window = [0, 0, 0.0]  # pairs, tokens, seconds since the last line
        self._batch_start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        if self._last_time is None:
            self._last_time = self._batch_start

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        seconds = now - (self._batch_start if self._batch_start is not None else now)
        self._train_seconds += seconds
        self._steps_timed += 1
        world = trainer.world_size
        self._window[0] += getattr(batch, "batch_size", 0) * world
        self._window[1] += _batch_tokens(batch) * world
        self._window[2] += seconds
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        due = step % self.every_n_steps == 0 or now - (self._last_time or now) >= self.every_seconds or step >= total
        if not due or not trainer.is_global_zero:
            return
        log.info(self.line(trainer, module, step, total))
        self._last_time = now
        self._window = [0, 0, 0.0]

    def line(self, trainer: L.Trainer, module: L.LightningModule, step: int, total: int) -> str:
        pairs, tokens, seconds = self._window
        parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
        max_epochs = trainer.max_epochs or 0
        parts.append(f"epoch {trainer.current_epoch + 1}/{max_epochs}" if max_epochs > 0 else "")
        loss = trainer.callback_metrics.get("loss", trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if seconds > 0:
            parts += [f"{pairs / seconds:,.1f} pairs/s", f"{tokens / seconds:,.0f} tokens/s"]
        if self._steps_timed:
            parts.append(f"eta {_duration(self._train_seconds / self._steps_timed * max(total - step, 0))}")
        parts.append(f"peak mem {_peak_memory_gib(module.device):.2f} GiB")
        return " | ".join(p for p in parts if p)
