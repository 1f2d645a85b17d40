"""The Lightning Trainer of a run, built in one place for the bi-encoder and the re-ranker.

The Trainer never clips (gradient_clip_val=None): the step driver does, once per optimizer step
(embedscale/strategy/base.py). The strategy comes from embedscale/strategy/; the loggers, the progress display,
the checkpoint callback and SLURM's requeue from the trainer and logger sections of the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from embedscale.config import LoggerConfig, LoggerName, Progress, TrainerConfig, TriState


def build_loggers(cfg: LoggerConfig, run_dir: Path) -> list:
    from lightning.pytorch import loggers

    out = []
    for name in cfg.loggers:
        if name == LoggerName.csv:
            out.append(loggers.CSVLogger(run_dir, name="logs", version=""))
        elif name == LoggerName.tensorboard:
            out.append(loggers.TensorBoardLogger(run_dir, name="tensorboard", version=""))
        elif name == LoggerName.wandb:
            if cfg.wandb_mode:
                os.environ["WANDB_MODE"] = str(cfg.wandb_mode)
            out.append(loggers.WandbLogger(project=cfg.project, save_dir=str(run_dir)))
    return out


def progress_callbacks(t: TrainerConfig) -> tuple[bool, list]:
    """(enable_progress_bar, callbacks) for trainer.progress: a live bar on terminals, plain lines in files."""
    from embedscale.contrastive.monitor import ProgressLines
    from embedscale.runtime import console_is_terminal

    mode = t.progress
    if mode is Progress.auto:
        mode = Progress.bar if console_is_terminal() else Progress.lines
    if mode is Progress.lines:
        return False, [ProgressLines(every_n_steps=t.log_every_n_steps, every_seconds=t.progress_every_seconds)]
    return mode is Progress.bar, []


def build_trainer(
    t: TrainerConfig,
    logger: LoggerConfig,
    run_dir: Path,
    callbacks: list,
    *,
    strategy="auto",
    checkpoints: bool = True,
):
    """The Trainer of a run writing into `run_dir`.

    Args:
        t, logger: the trainer and logger sections.
        callbacks: the job's callbacks (evaluation, data progress, ...), placed after the progress display and
            before the checkpoint callback (Lightning runs checkpoint callbacks last anyway).
        strategy: what `L.Trainer(strategy=...)` takes (embedscale.strategy.build_strategy).
        checkpoints: write checkpoints/last.ckpt (and on SIGUSR1 under SLURM); False for jobs that keep none.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from embedscale.contrastive.monitor import TrainingMonitor

    progress_bar, progress = progress_callbacks(t)
    callbacks = [*progress, *callbacks]  # progress first: its step timing ends before an evaluation begins
    plugins = []
    if checkpoints:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=t.checkpoint_every_n_steps,
                enable_version_counter=False,  # last.ckpt is overwritten, also after a resume (not last-v1.ckpt)
            )
        )
        on_slurm = SLURMEnvironment.detect()
        if t.requeue_on_signal == TriState.true or (t.requeue_on_signal == TriState.auto and on_slurm):
            from embedscale.contrastive.callbacks import RequeueOnSignal

            callbacks.append(RequeueOnSignal(run_dir / "checkpoints" / "last.ckpt"))
            if on_slurm:
                plugins.append(SLURMEnvironment(auto_requeue=False))  # ours saves at a step boundary instead
    loggers = build_loggers(logger, run_dir)
    if loggers:
        callbacks += [LearningRateMonitor(logging_interval="step"), TrainingMonitor()]
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=str(t.accelerator),
        devices=t.devices,
        strategy=strategy,
        num_nodes=t.num_nodes,
        precision=str(t.precision),
        gradient_clip_val=None,  # the step driver clips (embedscale/strategy/base.py)
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=progress_bar,
        enable_checkpointing=checkpoints,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the DataModule shards (same global batches for any world size)
        limit_val_batches=0,
        num_sanity_val_steps=0,
        plugins=plugins or None,
    )


def resume_path(t: TrainerConfig, run_dir: Path) -> str | None:
    """The checkpoint trainer.resume names (`last`: the run directory's, when it exists), checked against the
    run's strategy; None for a fresh start."""
    from embedscale.strategy import check_resume

    resume = t.resume
    if resume is None:
        return None
    if resume == "last":
        last = run_dir / "checkpoints" / "last.ckpt"  # a directory under DeepSpeed
        if not last.exists():
            return None
        resume = str(last)
    elif not Path(resume).exists():
        raise ValueError(f"trainer.resume={resume!r} does not exist: give a checkpoint path or `last`")
    check_resume(t, resume)
    return resume
