"""The non-finite guard: a diverging run stops at its first non-finite step, on every rank, and is never exported.

Checked once per optimizer step, after the backward and before the update: the step's loss and the gradient's
global norm (which the step driver computes anyway to clip; where the driver cannot, under DeepSpeed, the loss
alone). Ranks agree through one all-reduce of a flag, so all of them stop -- or skip -- at the same step; a rank
that raised alone would leave the others waiting in their next collective.

What happens at a non-finite step:
- by default, a `NonFiniteError` (a RuntimeError) naming the step, the rank, the last finite loss, the learning
  rate and temperature, and what to change. The job exits non-zero before any export, so nothing non-finite is
  ever written as a result (the export also refuses non-finite weights: export.py);
- with `trainer.skip_nonfinite_steps=N`, the first N such steps are skipped instead (the optimizer sees no
  gradient: AdamW leaves weights and moments untouched), counted and named in metrics.json (`train.nonfinite`).
  Not under DeepSpeed, whose engine owns the partitioned gradients: there the first one stops the run.
"""

from __future__ import annotations

import logging
import math

import torch

from embedscale.distributed import any_rank, world

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run diverged: a loss or gradient norm became NaN or infinite."""


class FiniteGuard:
    def __init__(self, *, skip_budget: int = 0, cannot_skip: str = "") -> None:
        self.skip_budget = skip_budget
        self.cannot_skip = cannot_skip  # why the strategy cannot skip a step (StepDriver.cannot_skip_steps), or ""
        self.skipped: list[dict] = []  # {step, loss, grad_norm} of every skipped step
        self.last_finite: tuple[int, float] | None = None  # (step, loss)

    def check(
        self, *, step: int, loss: torch.Tensor | None, grad_norm: torch.Tensor | None, lr: float, temperature: float
    ) -> bool:
        """True when the step may update the weights; False when it is to be skipped (all ranks agree). Raises
        NonFiniteError past the skip budget."""
        values = [float(v) for v in (loss, grad_norm) if v is not None]
        bad_here = any(not math.isfinite(v) for v in values)
        device = loss.device if isinstance(loss, torch.Tensor) else None
        if not any_rank(bad_here, device):
            if loss is not None:
                self.last_finite = (step, float(loss))
            return True
        record = {"step": step, "loss": _num(loss), "grad_norm": _num(grad_norm)}
        if not self.cannot_skip and len(self.skipped) < self.skip_budget:
            self.skipped.append(record)
            log.warning(
                "non-finite step %d (loss %s, gradient norm %s): skipped, %d of trainer.skip_nonfinite_steps=%d",
                step,
                record["loss"],
                record["grad_norm"],
                len(self.skipped),
                self.skip_budget,
            )
            return False
        raise NonFiniteError(self.message(record, lr=lr, temperature=temperature, bad_here=bad_here))

    def message(self, record: dict, *, lr: float, temperature: float, bad_here: bool) -> str:
        rank, size = world()
        where = f"rank {rank}" if bad_here else f"another rank than {rank}"
        last = (
            f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
            if self.last_finite
            else "no finite step before it"
        )
        skip = (
            f"or skip up to N such steps with trainer.skip_nonfinite_steps=N ({len(self.skipped)} skipped so far)"
            if not self.cannot_skip
            else f"(this strategy cannot skip a step: {self.cannot_skip})"
        )
        return (
            f"non-finite training at step {record['step']} ({where} of {size}): loss {record['loss']}, gradient norm "
            f"{record['grad_norm']}; {last}; learning rate {lr:.3g}, temperature {temperature:.4g}. The run diverged "
            "and is stopped before anything is exported: lower optim.lr, keep trainer.gradient_clip_val > 0, raise "
            "loss.temperature, train in trainer.precision=32-true, check that step's samples (data.record_keys=true "
            f"names them), {skip}"
        )

    def summary(self) -> dict:
        return {"skipped_steps": len(self.skipped), "skipped": self.skipped, "skip_budget": self.skip_budget}


def _num(value) -> str | None:
    return None if value is None else f"{float(value):.6g}"
