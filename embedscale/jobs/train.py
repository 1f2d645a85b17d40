"""Job `embedscale train`: compose -> encoder, evaluation, module, Trainer, data -> fit -> export -> metrics.json.

Heavy imports (torch, Lightning, transformers) happen inside `run`, after Hydra composed and validated the
config, so `embedscale train loss.temprature=0.05` fails in about a second. Also runnable as
`python -m embedscale.jobs.train` (and under torchrun).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from embedscale.config import TrainConfig
from embedscale.jobs.launch import hydra_job

log = logging.getLogger(__name__)


def run(cfg: TrainConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, export; returns what metrics.json holds (on rank 0; {} elsewhere)."""
    from embedscale.config import resolve_batch_sizes
    from embedscale.contrastive.anchor import StartAnchor
    from embedscale.contrastive.callbacks import EvalCallback, Heartbeat, RngResume, export_best_weights
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.contrastive.trainer import build_trainer, resume_path
    from embedscale.data.datamodule import DataProgress, build_datamodule
    from embedscale.data.records import resolve_data_root
    from embedscale.distributed import explain_stall
    from embedscale.encoder.biencoder import load_encoder, load_guide
    from embedscale.export import export_model, resolve_init_from
    from embedscale.runtime import check_run_dir, start_run
    from embedscale.strategy import after_fit_callbacks, build_strategy

    start = time.perf_counter()
    run_dir = start_run(
        Path(cfg.run_dir or run_dir or "runs/train"),
        seed=cfg.seed,
        num_threads=cfg.trainer.num_threads,
        allocator=str(cfg.trainer.host_allocator),
    )
    check_run_dir(run_dir, resume=cfg.trainer.resume, overwrite=cfg.overwrite)
    root = resolve_data_root(cfg.data.root)
    parent = None
    if cfg.init_from:
        cfg.model.name_or_path, parent = resolve_init_from(cfg.init_from)
        log.info("init_from %s: starting from the export %s", cfg.init_from, cfg.model.name_or_path)
    encoder, tokenizer = load_encoder(cfg.model)
    if parent is not None:
        parent["weights"] = encoder.fingerprint("query")
    eval_cb = EvalCallback.for_run(cfg.eval, encoder, tokenizer, root=root, run_dir=run_dir)
    module = ContrastiveModule(
        encoder, loss_cfg=cfg.loss, optim_cfg=cfg.optim, gradcache=cfg.gradcache, trainer_cfg=cfg.trainer
    )
    if cfg.loss.guide_model:
        module.set_guide(load_guide(cfg.model, cfg.loss.guide_model, tokenizer))
    anchor = StartAnchor.for_run(encoder, cfg.anchor)  # copies the start now: before a resume loads a checkpoint
    callbacks = [eval_cb, RngResume(), DataProgress(), Heartbeat(), *after_fit_callbacks(cfg.trainer, cfg.model)]
    callbacks = [anchor, *callbacks] if anchor else callbacks  # first: it interpolates before the final evaluation
    strategy = build_strategy(cfg.trainer, gradcache=cfg.gradcache.enabled)
    trainer = build_trainer(cfg.trainer, cfg.logger, run_dir, callbacks, strategy=strategy)
    sizes = resolve_batch_sizes(cfg, trainer.world_size)  # the launcher's real world size (devices=auto, SLURM)
    datamodule = build_datamodule(
        cfg.data, sizes, tokenizer=tokenizer, model_cfg=encoder.cfg, root=root, seed=cfg.seed, run_dir=run_dir
    )
    fit_start = time.perf_counter()
    resume = resume_path(cfg.trainer, run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except Exception as err:  # a timed-out collective: name the rank that stopped responding
        explained = explain_stall(err, timeout=cfg.trainer.collective_timeout)
        if explained is err:
            raise
        raise explained from err
    fit_seconds = time.perf_counter() - fit_start
    if resume and module.steps_this_run == 0:  # e.g. a run that ended at max_steps, resumed with only max_steps raised
        log.warning(
            "trainer.resume=%s: the checkpoint had already reached the end of training (step %d, epoch %d of "
            "trainer.max_epochs=%d, trainer.max_steps=%d): no step was trained. A run that stopped at max_steps "
            "counts its epoch as finished: raise trainer.max_epochs too to continue it (in the next epoch's order)",
            resume, trainer.global_step, trainer.current_epoch, cfg.trainer.max_epochs, cfg.trainer.max_steps,
        )  # fmt: skip
        if anchor is not None and anchor.interpolates:
            anchor.finish_without_fit(trainer, module, eval_cb)
    if not trainer.is_global_zero:
        return {}
    result = run_record(cfg, run_dir, trainer, datamodule, sizes, eval_cb, parent=parent, fit_seconds=fit_seconds)
    result["anchor"] = anchor.summary() if anchor else None
    summary = result["eval"]
    card_metrics = summary.get("after")
    if cfg.eval.export_best and eval_cb.best is not None and eval_cb.best["step"] != trainer.global_step:
        card_metrics = export_best_weights(module, eval_cb)
        result["exported"] = f"best (step {eval_cb.best['step']})"
    if cfg.export:
        result["export_dir"] = str(
            export_model(encoder, tokenizer, run_dir / "model", metrics=card_metrics, config=cfg)
        )
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if "wandb" in cfg.logger.loggers:  # the figures of `embedscale report` on the wandb run too
        from embedscale.reporting import log_report_to_wandb, write_report

        write_report(run_dir)
        log_report_to_wandb(run_dir)
    print_before_after(summary, eval_cb.evaluators)
    print(f"run directory: {run_dir}  (metrics.json, checkpoints/, model/)  wall {result['wall_seconds']:.0f} s")
    return result


def run_record(cfg, run_dir: Path, trainer, datamodule, sizes, eval_cb, *, parent, fit_seconds: float) -> dict:
    """What metrics.json holds of a finished fit (the export and the wall time are added after)."""
    from embedscale.export import to_jsonable

    return {
        "run_dir": str(run_dir),
        "model": cfg.model.name_or_path,
        "init_from": parent,
        "config": to_jsonable(cfg),
        "train": {
            "optimizer_steps": trainer.global_step,
            "steps_this_run": trainer.lightning_module.steps_this_run,  # fewer than optimizer_steps after a resume
            **datamodule.summary(),
            "global_batch_size": sizes.global_batch_size,
            "batch_size_per_rank": sizes.batch_size_per_rank,
            "fit_seconds": round(fit_seconds, 1),
            "nonfinite": trainer.lightning_module.guard.summary() if trainer.lightning_module.guard else None,
        },
        "eval": {entry["tag"]: entry["metrics"] for entry in eval_cb.history},
        "eval_history": eval_cb.history,
        "best": eval_cb.best,
        "stopped_early": eval_cb.stopped_early,
    }


def print_before_after(summary: dict[str, dict[str, float]], evaluators: list) -> None:
    """The before / after table of the main metrics (rich)."""
    if not summary:
        return
    from rich.console import Console
    from rich.table import Table

    before, after = summary.get("before", {}), summary.get("after", {})
    candidates = [f"{ev.name}/{m}" for ev in evaluators for m in ("ndcg@10", "recall@100", "mrr@10", "spearman")]
    names = [n for n in candidates if n in (after or before)]
    table = Table(title="embedscale: before / after fine-tuning")
    for col in ("metric", "before", "after", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in names:
        b, a = before.get(name), after.get(name)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        delta = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        table.add_row(name, fmt(b), fmt(a), delta)
    Console().print(table)


main = hydra_job("train", run)

if __name__ == "__main__":
    main()
