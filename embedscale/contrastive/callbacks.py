"""EvalCallback: retrieval/STS evaluation before training, every N steps, and after training.

Every rank takes part: the corpus and queries are encoded sharded over the ranks
(retrieval/encode.py), the metrics are computed once on rank 0 and broadcast, so the numbers equal a
single-process evaluation while the encoding cost is split W ways. Rank 0 logs them to every logger
at the current global step and into `history`, from which the train job writes metrics.json and the
before/after table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from embedscale.retrieval.evaluator import evaluate_all

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    def __init__(
        self,
        evaluators: list,
        tokenizer,
        *,
        before: bool = True,
        every_n_steps: int = 0,
        run_dir: Path | None = None,
        primary: str | None = None,
        selection: list[str] | None = None,
        patience: int = 0,
        best_checkpoint: Path | None = None,
    ) -> None:
        """`primary` (e.g. "scifact/ndcg@10") selects the best evaluation after training started, or, when given,
        the mean of the `selection` metrics (logged as "selection"); with `best_checkpoint`, the weights of each new
        best are saved there (model, optimizer, data cursor). `patience` > 0 stops training after that many
        evaluations in a row without a new best."""
        self.evaluators = evaluators
        self.tokenizer = tokenizer
        self.before = before
        self.every_n_steps = every_n_steps
        self.run_dir = run_dir
        self.primary = primary
        self.selection = list(selection or [])
        self.patience = patience
        self.since_best = 0  # evaluations since the best one (early stopping)
        self.stopped_early: dict | None = None  # {"step", "evaluations_without_improvement"}
        self.best_checkpoint = best_checkpoint
        self.best: dict | None = None  # {"step", "tag", "metric", "value", "checkpoint"}
        self.history: list[dict] = []
        self._last_step = -1  # same on every rank, so that all of them reach the barrier together

    @classmethod
    def for_run(cls, cfg, encoder, tokenizer, *, root: Path, run_dir: Path) -> EvalCallback:
        """The evaluation of a training run (eval.*): its sets, and the primary metric that selects the best
        evaluation (eval.primary_metric of the first BEIR or pairs set, else the first STS set's spearman)."""
        from embedscale.encoder.biencoder import check_lengths
        from embedscale.retrieval.evaluator import build_evaluators

        check_lengths(encoder.query_backbone, {"eval.max_length": cfg.max_length})
        evaluators = build_evaluators(cfg, root=root, default_max_length=encoder.cfg.document_max_length)
        primary = None
        if evaluators:
            retrieval = cfg.beir or cfg.pairs  # the evaluators' order: BEIR, pairs, STS
            primary = f"{evaluators[0].name}/{'spearman' if not retrieval else cfg.primary_metric}"
        return cls(
            evaluators,
            tokenizer,
            before=cfg.before_training,
            every_n_steps=cfg.every_n_steps,
            run_dir=run_dir if cfg.save_runs else None,
            primary=primary,
            selection=cfg.selection,
            patience=cfg.early_stopping_patience,
            best_checkpoint=run_dir / "checkpoints" / "best.ckpt",
        )

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule, tag: str) -> None:
        if not self.evaluators:
            return
        step = trainer.global_step
        self._last_step = step
        start = time.perf_counter()
        metrics = evaluate_all(self.evaluators, module.encoder, self.tokenizer, run_dir=self.run_dir, tag=f"-{tag}")
        if self.selection:  # the same on every rank: the metrics are broadcast
            metrics["selection"] = sum(float(metrics[k]) for k in self.selection) / len(self.selection)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            self.history.append({"tag": tag, "step": step, "seconds": round(seconds, 1), "metrics": metrics})
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            log.info("eval %s at step %d (%.0f s): %s", tag, step, seconds, metrics)
        self._track_best(trainer, tag, step, metrics)  # metrics are the same on every rank (broadcast)
        trainer.strategy.barrier("embedscale-eval")

    def _track_best(self, trainer: L.Trainer, tag: str, step: int, metrics: dict) -> None:
        if self.primary is None or tag == "before":
            return
        key = "selection" if self.selection else self.primary
        if key not in metrics:
            raise ValueError(
                f"eval.primary_metric: {self.primary!r} is not among the evaluation's metrics "
                f"({', '.join(sorted(metrics)[:8])}, ...): set eval.primary_metric to one of their suffixes"
            )
        value = float(metrics[key])
        if self.best is not None and value <= self.best["value"]:
            self.since_best += 1
            if self.patience and self.since_best >= self.patience and not trainer.should_stop:
                trainer.should_stop = True  # every rank decides alike (same metrics): Lightning stops after this step
                self.stopped_early = {"step": step, "evaluations_without_improvement": self.since_best}
                log.info("eval: no new best %s in %d evaluations: stopping at step %d", key, self.since_best, step)
            return
        self.since_best = 0
        metric = f"selection: mean of {', '.join(self.selection)}" if self.selection else self.primary
        self.best = {"step": step, "tag": tag, "metric": metric, "value": value, "checkpoint": None}
        if self.best_checkpoint is not None:
            trainer.save_checkpoint(self.best_checkpoint, weights_only=False)  # all ranks call it; rank 0 writes
            self.best["checkpoint"] = str(self.best_checkpoint)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.before:
            self.evaluate(trainer, module, "before")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, module, f"step{step}")

    def final_evaluation(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Evaluate the weights as they are now as "after", replacing an "after" restored from a checkpoint (a fit
        that resumed a finished run and changed its weights without training: anchor.interpolation)."""
        self.history = [entry for entry in self.history if entry["tag"] != "after"]
        self.evaluate(trainer, module, "after")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, module, "after")
        elif self.history:
            self.history[-1]["tag"] = "after"
            if self.best is not None and self.best["step"] == trainer.global_step:
                self.best["tag"] = "after"

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "last_step": self._last_step,
            "best": self.best,
            "since_best": self.since_best,
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = int(state_dict.get("last_step", -1))
        self.best = state_dict.get("best")
        self.since_best = int(state_dict.get("since_best", 0))
        self.stopped_early = state_dict.get("stopped_early")


def export_best_weights(module: L.LightningModule, eval_cb: EvalCallback) -> dict:
    """Load the best evaluation's weights (checkpoints/best.ckpt) into `module` (eval.export_best); returns that
    evaluation's metrics, for the model card."""
    best = eval_cb.best
    from embedscale.checkpoints import read_model_state

    state = read_model_state(best["checkpoint"])  # a file, or the shards of an fsdp2 run
    module.load_state_dict(state)  # the encoder inside the module is the one exported
    log.info("exporting the best weights: %s = %.4f at step %d", best["metric"], best["value"], best["step"])
    return next(h["metrics"] for h in eval_cb.history if h["step"] == best["step"])


class Heartbeat(L.Callback):
    """Each rank records the last step it finished in the process group's store, so that a collective that times
    out can name the rank that stopped responding (embedscale.distributed.explain_stall)."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        from embedscale.distributed import heartbeat

        heartbeat(trainer.global_step)


class RngResume(L.Callback):
    """Checkpoints every rank's RNG state (CPU, and CUDA on GPUs) and restores it at the first batch after a
    resume, so dropout draws what the uninterrupted run drew: a resumed run ends with the same weights.

    Only the model draws from the global generator between two batches: the data modules give their
    DataLoaders a generator of their own (a DataLoader draws its workers' base seed whenever it makes an
    epoch's iterator, which a resumed run does at another moment than the uninterrupted one)."""

    KEY = "embedscale_rng"

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state_S = torch.get_rng_state()  # (S,) uint8
        if pl_module.device.type == "cuda":
            state_S = torch.cat([state_S, torch.cuda.get_rng_state(pl_module.device)])
        states_WS = pl_module.all_gather(state_S.to(pl_module.device))  # every rank takes part in a save
        checkpoint[self.KEY] = states_WS.reshape(trainer.world_size, -1).cpu()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states_WS = checkpoint.get(self.KEY)
        if states_WS is None:
            return
        if states_WS.shape[0] != trainer.world_size:
            log.warning(
                "resume: the checkpoint holds RNG states of %d ranks, this run has %d: dropout will not replay "
                "the interrupted run's masks",
                states_WS.shape[0],
                trainer.world_size,
            )
            return
        state_S, n = states_WS[trainer.global_rank], torch.get_rng_state().numel()
        self._pending = (state_S[:n].clone(), state_S[n:].clone() if state_S.numel() > n else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        cpu, cuda = self._pending
        torch.set_rng_state(cpu)
        if cuda is not None and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, pl_module.device)
        self._pending = None


class RequeueOnSignal(L.Callback):
    """Preemption-safe SLURM requeue: on the signal (`#SBATCH --signal=USR1@90`), checkpoint at the next
    batch boundary, `scontrol requeue` the job, and exit; the requeued job resumes from that checkpoint
    (`trainer.resume=last`) with model, optimizer, scheduler and the data cursor.

    Why not Lightning's auto-requeue: it saves from inside the signal handler, i.e. at whatever bytecode
    the main thread was running -- possibly between `optimizer.step()` and the callback that advances
    the data cursor, which would replay a batch. Here the handler only sets a flag; the flag is
    all-reduced (max) every step, so all ranks act at the same step even though SLURM signals each task
    at a slightly different time, and the checkpoint is taken after every callback of that step ran.
    """

    def __init__(self, checkpoint: Path, *, signum: int | None = None) -> None:
        import signal

        self.checkpoint = Path(checkpoint)
        self.signum = signal.SIGUSR1 if signum is None else signum
        self.received = False

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import signal

        signal.signal(self.signum, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() == 0:
            return
        step = trainer.global_step
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # every rank takes part (a barrier)
        trainer.strategy.barrier("embedscale-requeue")
        if trainer.is_global_zero:
            requeue_slurm_job(step=step, checkpoint=self.checkpoint)
        trainer.strategy.barrier("embedscale-requeued")
        import os

        os._exit(0)  # the job is requeued; nothing after this step may run (no final eval, no export)


def requeue_slurm_job(*, step: int, checkpoint: Path) -> None:
    import os
    import subprocess

    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("requeue signal outside a SLURM job: checkpoint %s written at step %d, exiting", checkpoint, step)
        return
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    log.warning(
        "requeue signal: checkpoint %s at step %d; scontrol requeue %s -> %s %s",
        checkpoint,
        step,
        job,
        proc.returncode,
        proc.stderr.strip(),
    )
