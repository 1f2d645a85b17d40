"""Job `embedscale train`: compose -> build -> Trainer.fit -> export -> metrics.json.

Heavy imports (torch, Lightning, transformers) happen inside `run`, after Hydra composed and
validated the config, so `embedscale train loss.temprature=0.05` fails in about a second.
Also runnable as `python -m embedscale.train` (and under torchrun).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job, start_run
from embedscale.config import TrainConfig, resolve_batch_sizes

log = logging.getLogger(__name__)


def build_loggers(cfg: TrainConfig, run_dir: Path) -> list:
    import os

    from lightning.pytorch import loggers

    out = []
    for name in cfg.logger.loggers:
        if name == "csv":
            out.append(loggers.CSVLogger(run_dir, name="logs", version=""))
        elif name == "tensorboard":
            out.append(loggers.TensorBoardLogger(run_dir, name="tensorboard", version=""))
        elif name == "wandb":
            if cfg.logger.wandb_mode:
                os.environ["WANDB_MODE"] = cfg.logger.wandb_mode
            out.append(loggers.WandbLogger(project=cfg.logger.project, save_dir=str(run_dir)))
    return out


def progress_callbacks(t) -> tuple[bool, list]:
    """(enable_progress_bar, callbacks) for trainer.progress: a live bar on terminals, plain lines in files."""
    from embedscale.config import Progress
    from embedscale.contrastive.monitor import ProgressLines
    from embedscale.runtime import console_is_terminal

    mode = t.progress
    if mode is Progress.auto:
        mode = Progress.bar if console_is_terminal() else Progress.lines
    if mode is Progress.lines:
        return False, [ProgressLines(every_n_steps=t.log_every_n_steps, every_seconds=t.progress_every_seconds)]
    return mode is Progress.bar, []


def build_trainer(cfg: TrainConfig, run_dir: Path, callbacks: list):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from embedscale.contrastive.monitor import TrainingMonitor

    t = cfg.trainer
    progress_bar, progress = progress_callbacks(t)
    callbacks = [
        *progress,  # first: its step timing ends before an evaluation at the step's end begins
        *callbacks,
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=t.checkpoint_every_n_steps,
            enable_version_counter=False,  # last.ckpt is overwritten, also after a resume (not last-v1.ckpt)
        ),
    ]
    plugins = []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    on_slurm = SLURMEnvironment.detect()
    if t.requeue_on_signal == "true" or (t.requeue_on_signal == "auto" and on_slurm):
        from embedscale.contrastive.callbacks import RequeueOnSignal

        callbacks.append(RequeueOnSignal(run_dir / "checkpoints" / "last.ckpt"))
        if on_slurm:
            plugins.append(SLURMEnvironment(auto_requeue=False))  # ours saves at a step boundary instead
    loggers = build_loggers(cfg, run_dir)
    if loggers:
        callbacks += [LearningRateMonitor(logging_interval="step"), TrainingMonitor()]
    from embedscale.strategy import DEEPSPEED, FSDP2, build_strategy, deepspeed_callbacks, fsdp2_callbacks

    if t.strategy in (FSDP2, DEEPSPEED) and (cfg.eval.beir or cfg.eval.sts):
        raise ValueError(f"trainer.strategy={t.strategy} does not evaluate during training yet: add eval=none")
    if t.strategy == FSDP2:
        callbacks += fsdp2_callbacks(cfg.model)
    if t.strategy == DEEPSPEED:
        callbacks += deepspeed_callbacks(cfg.model)
    # GradCache clips itself; DeepSpeed clips in its engine (trainer.gradient_clip_val -> its gradient_clipping)
    clip_in_trainer = not cfg.gradcache.enabled and t.strategy != DEEPSPEED
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=build_strategy(t, gradcache=cfg.gradcache.enabled),
        num_nodes=t.num_nodes,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val if clip_in_trainer else None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=progress_bar,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the DataModule shards (same global batches for any world size)
        limit_val_batches=0,
        num_sanity_val_steps=0,
        plugins=plugins or None,
    )


def resume_path(cfg: TrainConfig, run_dir: Path) -> str | None:
    resume = cfg.trainer.resume
    if resume is None:
        return None
    if resume == "last":
        last = run_dir / "checkpoints" / "last.ckpt"  # a directory under DeepSpeed
        if not last.exists():
            return None
        resume = str(last)
    elif not Path(resume).exists():
        raise ValueError(f"trainer.resume={resume!r} does not exist: give a checkpoint path or `last`")
    from embedscale.strategy import check_resume_strategy

    check_resume_strategy(cfg.trainer, resume)
    return resume


def resolve_init_from(init_from: str) -> tuple[str, dict]:
    """(export directory, parent record) of `init_from`: a run directory holding model/, or an export."""
    from embedscale.encoder.biencoder import EXPORT_META

    path = Path(init_from).expanduser().resolve()
    for candidate in (path / "model", path):
        if (candidate / EXPORT_META).is_file():
            break
    else:
        raise ValueError(
            f"init_from={init_from!r}: neither {path / 'model'} nor {path} is an embedscale export (no {EXPORT_META}); "
            "give a training run directory whose export succeeded (export=true) or its model/ directory"
        )
    parent: dict = {"path": str(candidate)}
    run_metrics = candidate.parent / "metrics.json"
    if candidate.name == "model" and run_metrics.is_file():
        done = json.loads(run_metrics.read_text())
        parent.update(run_dir=str(candidate.parent), model=done.get("model"), eval=done.get("eval", {}).get("after"))
    return str(candidate), parent


def summarize(history: list[dict]) -> dict[str, dict[str, float]]:
    return {entry["tag"]: entry["metrics"] for entry in history}


def print_table(summary: dict[str, dict[str, float]], names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = summary.get("before", {}), summary.get("after", {})
    table = Table(title="embedscale: before / after fine-tuning")
    for col in ("metric", "before", "after", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in names:
        b, a = before.get(name), after.get(name)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        delta = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        table.add_row(name, fmt(b), fmt(a), delta)
    Console().print(table)


def run(cfg: TrainConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, export; returns what metrics.json holds."""
    from embedscale.config import DataFormat
    from embedscale.contrastive.callbacks import EvalCallback, RngResume
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.datamodule import PairDataModule, PairProgress, StreamDataModule, StreamProgress
    from embedscale.data.readers import resolve_data_root
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.export import export_model, to_jsonable
    from embedscale.retrieval.evaluator import build_evaluators

    start = time.perf_counter()
    run_dir = start_run(
        Path(cfg.run_dir or run_dir or "runs/train"), seed=cfg.seed, num_threads=cfg.trainer.num_threads
    )
    data_root = resolve_data_root(cfg.data.root)
    parent = None
    if cfg.init_from:
        cfg.model.name_or_path, parent = resolve_init_from(cfg.init_from)
        log.info("init_from %s: starting from the export %s", cfg.init_from, cfg.model.name_or_path)
    encoder, tokenizer = load_encoder(cfg.model)
    if parent is not None:
        parent["weights"] = encoder.fingerprint("query")
    evaluators = build_evaluators(cfg.eval, root=data_root, default_max_length=encoder.cfg.document_max_length)
    primary = None
    if evaluators:
        first = evaluators[0]
        primary = f"{first.name}/{'spearman' if not cfg.eval.beir else cfg.eval.primary_metric}"
    eval_cb = EvalCallback(
        evaluators,
        tokenizer,
        before=cfg.eval.before_training,
        every_n_steps=cfg.eval.every_n_steps,
        run_dir=run_dir if cfg.eval.save_runs else None,
        primary=primary,
        best_checkpoint=run_dir / "checkpoints" / "best.ckpt",
    )
    module = ContrastiveModule(
        encoder,
        loss_cfg=cfg.loss,
        optim_cfg=cfg.optim,
        gradcache=cfg.gradcache,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
    )
    callbacks: list = [eval_cb, RngResume()]
    data_args = dict(tokenizer=tokenizer, model_cfg=encoder.cfg, root=data_root, seed=cfg.seed)
    if cfg.data.format is DataFormat.shards:
        datamodule = StreamDataModule(cfg.data, **data_args)
        callbacks.append(StreamProgress(datamodule, record_dir=run_dir / "samples" if cfg.data.record_keys else None))
    else:
        datamodule = PairDataModule(cfg.data, **data_args)
        callbacks.append(PairProgress(datamodule))
    trainer = build_trainer(cfg, run_dir, callbacks)
    resolve_batch_sizes(cfg, trainer.world_size)  # the launcher's real world size (devices=auto, SLURM, ...)
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, run_dir), weights_only=True)
    fit_seconds = time.perf_counter() - fit_start
    if not trainer.is_global_zero:
        return {}
    summary = summarize(eval_cb.history)
    result = {
        "run_dir": str(run_dir),
        "model": cfg.model.name_or_path,
        "init_from": parent,
        "config": to_jsonable(cfg),
        "train": {
            "optimizer_steps": trainer.global_step,
            "examples": len(getattr(datamodule, "examples", None) or []) or None,
            "stream": datamodule.state_dict() if isinstance(datamodule, StreamDataModule) else None,
            "skipped_samples": getattr(datamodule, "skipped", {}),
            "global_batch_size": cfg.data.global_batch_size,
            "batch_size_per_rank": cfg.data.batch_size_per_rank,
            "fit_seconds": round(fit_seconds, 1),
        },
        "eval": summary,
        "eval_history": eval_cb.history,
        "best": eval_cb.best,
    }
    best, card_metrics = eval_cb.best, summary.get("after")
    if cfg.eval.export_best and best is not None and best["step"] != trainer.global_step:
        import torch

        state = torch.load(best["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)  # the encoder inside the module is the one exported below
        card_metrics = next(h["metrics"] for h in eval_cb.history if h["step"] == best["step"])
        result["exported"] = f"best (step {best['step']})"
        log.info("exporting the best weights: %s = %.4f at step %d", best["metric"], best["value"], best["step"])
    if cfg.export:
        export_dir = export_model(encoder, tokenizer, run_dir / "model", metrics=card_metrics, config=cfg)
        result["export_dir"] = str(export_dir)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if "wandb" in cfg.logger.loggers:  # the figures of `embedscale report` on the wandb run too
        from embedscale.report import log_report_to_wandb, write_report

        write_report(run_dir)
        log_report_to_wandb(run_dir)
    if summary:
        names = [f"{ev.name}/{m}" for ev in evaluators for m in ("ndcg@10", "recall@100", "mrr@10", "spearman")]
        print_table(summary, [n for n in names if n in summary.get("after", summary.get("before", {}))])
    print(f"run directory: {run_dir}  (metrics.json, checkpoints/, model/)  wall {result['wall_seconds']:.0f} s")
    return result


main = hydra_job("train", TrainConfig, run)

if __name__ == "__main__":
    main()
