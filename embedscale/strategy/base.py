"""The step driver: how one optimizer step's gradients are produced, synchronised and clipped under a strategy.

The LightningModule (contrastive/module.py) and GradCache (contrastive/gradcache.py) never name a strategy; they
call the driver of the run, which `driver_for` picks once from the live Lightning strategy:

    hook                       one process   DDP                   FSDP2 (fsdp2.py)         DeepSpeed (deepspeed.py)
    configure_model            -             -                     shard each layer         -
    begin_step (GradCache)     -             reducer off           -                        -
    backward                   autograd      autograd              autograd (reduce-scatter) engine micro-step
    after_backward (automatic) -             -                     average replicated       -
    sync_gradients (GradCache) -             one flat all-reduce   replicated ones only     - (the engine)
    clip (returns the norm)    norm          norm                  sharded global norm      - (the engine)

`clip` is the one place that decides clipping: its value is `max_grad_norm(trainer_cfg)` (trainer.gradient_clip_val,
read nowhere else), Lightning's own clipping is switched off (the Trainer gets gradient_clip_val=None), and the
module calls `driver.clip` once per optimizer step in either optimisation mode. Under DeepSpeed the engine
clips at the same value (its `gradient_clipping`), so the driver's clip does nothing there.

Checkpoints carry the driver's `checkpoint_tag`; resuming under another tag is refused (optimizer states of the
sharded strategies are laid out differently).
"""

from __future__ import annotations

from typing import Any

import torch

from embedscale.distributed import all_reduce_gradients_

STRATEGY_KEY = "embedscale_strategy"
"""Checkpoint key holding the tag of the strategy that wrote it (StepDriver.checkpoint_tag)."""


def max_grad_norm(trainer_cfg) -> float:
    """The clipping threshold of a run (trainer.gradient_clip_val); 0.0: no clipping."""
    return float(trainer_cfg.gradient_clip_val or 0.0)


class StepDriver:
    """One process: plain autograd, nothing to synchronise. The base of every driver."""

    checkpoint_tag = "replicated"
    """Strategies whose checkpoints resume each other share a tag (one process and DDP do)."""
    shards_gradients = False
    """A rank holds a shard of the gradient (or none): its local norm is not the gradient's norm."""
    cannot_skip_steps = ""
    """Empty when a step can be skipped by clearing the gradients before the optimizer runs (the non-finite guard's
    skip); else why this strategy cannot, as the guard's error says it."""
    keeps_params_across_passes = False
    """Parameters stay gathered between forward passes (FSDP2 buffers, ZeRO-3 persistent parameters): a GradCache
    embedding pass must then run under no_grad, not inference_mode, whose tensors the grad passes cannot use."""

    def __init__(self, *, max_norm: float = 0.0) -> None:
        self.max_norm = max_norm

    def prepare(self, module) -> None:
        """At Lightning's `setup`, before `configure_model`."""

    def configure_model(self, module) -> None:
        """At Lightning's `configure_model`: apply sharding to the module's plain backbones."""

    def begin_step(self, module, *, manual: bool) -> None:
        """Before a training step (`manual`: GradCache's several backward passes follow)."""

    def backward(self, module, loss: torch.Tensor, *, is_last: bool, cache: bool = False) -> None:
        """One backward pass of a GradCache step: the cache's (`cache`: the loss to the embeddings and the
        temperature, plain autograd), then one per chunk through Lightning's `manual_backward` (its precision
        plugin sees it); `is_last` marks the step's last. Outside a Trainer (embedscale doctor, tests): autograd."""
        if cache or getattr(module, "_trainer", None) is None:
            loss.backward()
        else:
            module.manual_backward(loss)

    def after_backward(self, module) -> None:
        """After the backward of an automatically optimised step."""

    def sync_gradients(self, module) -> None:
        """Once per GradCache step, after its last backward: every rank holds the step's average gradient."""
        all_reduce_gradients_(module.parameters())

    def clip(self, module, optimizer) -> torch.Tensor | None:
        """Clip the gradient's global norm at `max_norm` (0: not at all), once per optimizer step; returns the norm
        before clipping (the non-finite guard reads it), or None when this driver cannot compute it.

        The same arithmetic as torch.nn.utils.clip_grad_norm_ (what Lightning's clipping calls): the total norm of
        the optimizer's gradients, then each scaled by min(1, max_norm / (norm + 1e-6))."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if self.max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return norm

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STRATEGY_KEY] = self.checkpoint_tag

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        written = checkpoint_tag_of(checkpoint)
        if written != self.checkpoint_tag:
            raise ValueError(
                f"trainer.resume: the checkpoint was written under {describe(written)} and this run uses "
                f"{describe(self.checkpoint_tag)}; the optimizer state does not carry over between them: resume with "
                "the trainer.strategy (and trainer.zero_stage) that wrote it"
            )


class DDPDriver(StepDriver):
    """DistributedDataParallel: its reducer averages the gradients of an ordinary step during the backward. A
    GradCache step runs several backward passes over varying subsets of the parameters, which the reducer does not
    support: it is switched off for the step and the gradients are averaged once, explicitly (sync_gradients)."""

    def begin_step(self, module, *, manual: bool) -> None:
        if manual:
            module.trainer.model.require_backward_grad_sync = False


def checkpoint_tag_of(checkpoint: dict[str, Any]) -> str:
    """The strategy tag a checkpoint was written under (also from the keys written before STRATEGY_KEY existed)."""
    if STRATEGY_KEY in checkpoint:
        return checkpoint[STRATEGY_KEY]
    if checkpoint.get("embedscale_zero_stage") is not None:
        return f"deepspeed-zero{checkpoint['embedscale_zero_stage']}"
    return "fsdp2" if checkpoint.get("embedscale_fsdp2") else "replicated"


def describe(tag: str) -> str:
    if tag == "replicated":
        return "one process or ddp"
    if tag.startswith("deepspeed-zero"):
        return f"deepspeed ZeRO-{tag.removeprefix('deepspeed-zero')}"
    return tag
