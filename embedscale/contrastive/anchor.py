"""anchor.*: keeping a fine-tuned model near its starting weights, against catastrophic forgetting (docs/domain.md).

Two tools, both on the weights (not the loss), so they act the same with or without GradCache:
- L2-SP (Li et al., 2018), decoupled as AdamW decouples weight decay: after every optimizer step that updated the
  weights, w <- w - lr x anchor.l2_sp_weight x (w - w_start), with this step's learning rate of w's group. A loss
  term would go through Adam's per-weight normalisation, which turns a quadratic pull into a sign-like one whose
  strength depends on the gradient's noise; the decoupled pull is a fixed fraction of the distance per step.
- Weight interpolation with the start (WiSE-FT, Wortsman et al., 2022): when training ends, before the final
  evaluation and the export, w <- w_start + anchor.interpolation x (w - w_start). The checkpoints always hold the
  trained weights: where Lightning would write checkpoints/last.ckpt in its own on_train_end (a run that stops at
  trainer.max_steps inside an epoch), that save is made before the interpolation. A fit resumed from a finished
  run trains no step and Lightning then calls no hook at all: the train job interpolates and evaluates it itself
  (`finish_without_fit`). So the interpolation can be chosen after training: `trainer.resume=<run>/checkpoints/
  last.ckpt anchor.interpolation=A` in a new run_dir evaluates and exports that run's model at A without training
  (docs/domain.md).

The starting weights are copied when the callback is made: in the train job that is before Lightning restores a
checkpoint, so a resumed run keeps the true start (the model the run began from, not the resume point). Only the
trained parameters (requires_grad) are anchored; the learnable temperature is not part of the encoder.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from embedscale.config import AnchorConfig

log = logging.getLogger(__name__)


class StartAnchor(L.Callback):
    def __init__(self, encoder: torch.nn.Module, cfg: AnchorConfig) -> None:
        self.cfg = cfg
        with torch.no_grad():
            self.start = {p: p.detach().clone() for p in encoder.parameters() if p.requires_grad}
        self.pulled_steps = 0
        self._handles: list = []

    @classmethod
    def for_run(cls, encoder: torch.nn.Module, cfg: AnchorConfig) -> StartAnchor | None:
        """The callback when anchor.* asks for one, else None (nothing is copied)."""
        return cls(encoder, cfg) if cfg.l2_sp_weight > 0 or cfg.interpolation < 1 else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = {p: start.to(p.device, p.dtype) for p, start in self.start.items()}  # once, not per step
        if self.cfg.l2_sp_weight > 0:
            for optimizer in trainer.optimizers:  # the torch optimizer: fires on GradCache's manual steps too
                optimizer = getattr(optimizer, "optimizer", optimizer)
                self._handles.append(optimizer.register_step_post_hook(self._pull))

    def _pull(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:  # noqa: ARG002 - torch's hook signature
        pulled = False
        with torch.no_grad():
            for group in optimizer.param_groups:
                rate = group["lr"] * self.cfg.l2_sp_weight
                for p in group["params"]:
                    start = self.start.get(p)
                    if start is None or p.grad is None:  # not anchored, or not updated (the non-finite guard)
                        continue
                    p.sub_(p - start, alpha=rate)
                    pulled = True
        self.pulled_steps += pulled

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.interpolates:
            for checkpoint in trainer.checkpoint_callbacks:  # Lightning's own last save comes after this hook:
                checkpoint.on_train_end(trainer, module)  # make it now, of the trained weights (else it is a no-op)
            self.interpolate()

    @property
    def interpolates(self) -> bool:
        return self.cfg.interpolation < 1

    def interpolate(self) -> None:
        """w <- w_start + anchor.interpolation x (w - w_start) on every anchored parameter."""
        alpha = self.cfg.interpolation
        with torch.no_grad():
            for p, start in self.start.items():
                start = start.to(p.device, p.dtype)
                p.copy_(start + alpha * (p - start))
        log.info("anchor.interpolation=%g: the final weights are start + %g x (trained - start)", alpha, alpha)

    def finish_without_fit(self, trainer: L.Trainer, module: L.LightningModule, evaluation) -> None:
        """A fit that resumed a finished run and trained no step ran no hook: interpolate its weights (on the
        training device) and evaluate them as the end of training does, in place of the restored final evaluation
        (which was of the trained weights)."""
        module.to(trainer.strategy.root_device)
        self.interpolate()
        evaluation.final_evaluation(trainer, module)

    def summary(self) -> dict:
        return {
            "l2_sp_weight": self.cfg.l2_sp_weight,
            "interpolation": self.cfg.interpolation,
            "anchored_parameters": len(self.start),
            "pulled_steps": self.pulled_steps,
        }
