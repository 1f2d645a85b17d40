"""EvalCallback: retrieval/STS evaluation before training, every N steps, and after training.

Rank 0 evaluates (sharded evaluation arrives with the evaluation issue) while the other ranks wait
at a barrier. Metrics go to every logger at the current global step and into `history`, from which
the train job writes metrics.json and the before/after table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from embedscale.retrieval.evaluator import evaluate_all

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    def __init__(
        self, evaluators: list, tokenizer, *, before: bool = True, every_n_steps: int = 0, run_dir: Path | None = None
    ) -> None:
        self.evaluators = evaluators
        self.tokenizer = tokenizer
        self.before = before
        self.every_n_steps = every_n_steps
        self.run_dir = run_dir
        self.history: list[dict] = []
        self._last_step = -1  # same on every rank, so that all of them reach the barrier together

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule, tag: str) -> None:
        if not self.evaluators:
            return
        step = trainer.global_step
        self._last_step = step
        if trainer.is_global_zero:
            start = time.perf_counter()
            metrics = evaluate_all(self.evaluators, module.encoder, self.tokenizer, run_dir=self.run_dir, tag=f"-{tag}")
            seconds = time.perf_counter() - start
            self.history.append({"tag": tag, "step": step, "seconds": round(seconds, 1), "metrics": metrics})
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            log.info("eval %s at step %d (%.0f s): %s", tag, step, seconds, metrics)
        trainer.strategy.barrier("embedscale-eval")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.before:
            self.evaluate(trainer, module, "before")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, module, f"step{step}")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, module, "after")
        elif self.history:
            self.history[-1]["tag"] = "after"

    def state_dict(self) -> dict:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = int(state_dict.get("last_step", -1))
