"""Job `embedscale reranker`: train a cross-encoder on query groups -> <run_dir>/model -> re-rank a bi-encoder's
top-k on BEIR sets -> metrics of the bi-encoder, the re-ranked and the interpolated runs -> metrics.json.

    embedscale reranker reranker.data=[/tmp/mined/scifact-bm25] reranker.num_negatives=7
    embedscale reranker reranker.train=false reranker.model=runs/reranker/<ts>/model

Three runs are reported per set, so that a cross-encoder is never judged alone: `biencoder` (the
first stage's top-k, unchanged), `reranked` (the same documents ordered by the cross-encoder alone)
and `interpolated` (alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder) per query). One process
only: the first-stage search after training is sharded over whatever ranks exist, and a
cross-encoder this size trains in minutes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job, start_run
from embedscale.config import RerankerJobConfig

log = logging.getLogger(__name__)

TAGS = {
    "biencoder": "bi-encoder top-k (first stage alone)",
    "reranked": "cross-encoder alone, re-ordering the bi-encoder's top-k",
    "interpolated": "alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder), per query",
}


def _data_paths(cfg: RerankerJobConfig) -> list[Path]:
    from embedscale.data.readers import resolve_data_root, resolve_path

    paths = cfg.reranker.data
    needs_root = any(not Path(p).expanduser().is_absolute() for p in paths)
    root = resolve_data_root(cfg.data_root) if needs_root else Path("/")
    return [resolve_path(p, root) for p in paths]


def fit(cfg: RerankerJobConfig, model, tokenizer, run_dir: Path) -> dict[str, Any]:
    """Train `model` in place on reranker.data; returns the training summary for metrics.json."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    from embedscale.contrastive.reranker import GroupCollator, RerankerModule, group_datamodule
    from embedscale.data.datamodule import StreamDataModule, StreamProgress
    from embedscale.train import build_loggers, progress_callbacks

    r, t = cfg.reranker, cfg.trainer
    collator = GroupCollator(tokenizer, num_negatives=r.num_negatives, max_length=r.max_length)
    datamodule = group_datamodule(
        _data_paths(cfg), collator=collator, global_batch_size=r.global_batch_size, seed=cfg.seed
    )
    progress_bar, callbacks = progress_callbacks(t)
    callbacks += [StreamProgress(datamodule)] if isinstance(datamodule, StreamDataModule) else []
    loggers = build_loggers(cfg, run_dir)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=progress_bar,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    module = RerankerModule(model, optim_cfg=cfg.optim, temperature=r.temperature)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    losses = module.losses
    n = max(1, min(10, len(losses) // 2))
    return {
        "optimizer_steps": trainer.global_step,
        "groups_per_step": r.global_batch_size,
        "pairs_per_step": r.global_batch_size * (1 + r.num_negatives),
        "fit_seconds": round(seconds, 1),
        "loss_first": sum(losses[:n]) / n if losses else None,
        "loss_last": sum(losses[-n:]) / n if losses else None,
        "masked_negatives": module.masked_negatives,
    }


def evaluate_reranking(cfg: RerankerJobConfig, model, tokenizer, run_dir: Path) -> tuple[dict, dict]:
    """(metrics by tag, seconds by step) of the bi-encoder's top-k, re-ranked and interpolated, on eval.beir."""
    from embedscale.config import ModelConfig
    from embedscale.data.readers import resolve_data_root, resolve_path
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators
    from embedscale.retrieval.metrics import retrieval_metrics
    from embedscale.retrieval.rerank import interpolate_runs, rerank_run, top_k_run

    r = cfg.reranker
    root = resolve_data_root(cfg.data_root)
    biencoder = bi_tokenizer = None
    if not r.biencoder_runs:
        biencoder, bi_tokenizer = load_encoder(ModelConfig(name_or_path=r.biencoder))
    max_length = biencoder.cfg.document_max_length if biencoder is not None else r.max_length
    evaluators = build_evaluators(cfg.eval, root=root, default_max_length=max_length)
    metrics: dict[str, dict[str, float]] = {tag: {} for tag in TAGS}
    seconds: dict[str, float] = {}
    for i, ev in enumerate(evaluators):
        start = time.perf_counter()
        if r.biencoder_runs:
            first = json.loads(resolve_path(r.biencoder_runs[i], root).read_text())
        else:  # search deep enough for top_k, whatever eval.k_values says
            first = dataclasses.replace(ev, k_values=(*ev.k_values, r.top_k)).search(biencoder, bi_tokenizer)
        first = top_k_run(first, r.top_k)
        seconds[f"{ev.name}/first_stage"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        reranked = rerank_run(first, ev.queries, ev.corpus, model, tokenizer, top_k=r.top_k, batch_size=r.batch_size)
        seconds[f"{ev.name}/rerank"] = round(time.perf_counter() - start, 1)
        runs = {
            "biencoder": first,
            "reranked": reranked,
            "interpolated": interpolate_runs(reranked, first, alpha=r.alpha),
        }
        for tag, run in runs.items():
            values = retrieval_metrics(run, ev.qrels, ev.k_values)
            metrics[tag].update({f"{ev.name}/{k}": v for k, v in values.items()})
            if cfg.eval.save_runs:
                path = run_dir / "runs" / f"{ev.name}-{tag}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(run))
    return metrics, seconds


def print_table(metrics: dict[str, dict[str, float]], names: list[str], *, alpha: float, top_k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedscale reranker: bi-encoder top-{top_k}, re-ranked by the cross-encoder")
    table.add_column("metric", no_wrap=True, min_width=max(map(len, names), default=6))  # never cut the name
    for col in ("biencoder", "reranked", "delta", f"interpolated a={alpha:g}", "delta"):
        table.add_column(col, justify="right")
    for name in names:
        b, c, m = (metrics[tag][name] for tag in TAGS)
        table.add_row(name, f"{b:.4f}", f"{c:.4f}", f"{c - b:+.4f}", f"{m:.4f}", f"{m - b:+.4f}")
    Console().print(table)
    for tag, what in TAGS.items():
        print(f"  {tag}: {what}")


def run(cfg: RerankerJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Train (unless reranker.train=false), save, evaluate re-ranking; returns what metrics.json holds."""
    from embedscale.encoder.crossencoder import load_cross_encoder, save_cross_encoder
    from embedscale.export import to_jsonable

    start = time.perf_counter()
    run_dir = start_run(
        Path(cfg.run_dir or run_dir or "runs/reranker"), seed=cfg.seed, num_threads=cfg.trainer.num_threads
    )
    r = cfg.reranker
    model, tokenizer = load_cross_encoder(r.model, max_length=r.max_length)
    result: dict[str, Any] = {"run_dir": str(run_dir), "model": r.model, "config": to_jsonable(cfg)}
    if r.train:
        result["train"] = fit(cfg, model, tokenizer, run_dir)
        result["model_dir"] = str(save_cross_encoder(model, tokenizer, run_dir / "model"))
    elif model.new_parameters:
        raise ValueError(
            f"reranker.model={r.model} has no trained cross-encoder head ({', '.join(model.new_parameters)} would "
            "be random): point reranker.model at a trained cross-encoder, or train one (reranker.train=true)"
        )
    if cfg.eval.beir:
        result["biencoder"] = r.biencoder_runs or r.biencoder
        result["eval"], result["eval_seconds"] = evaluate_reranking(cfg, model, tokenizer, run_dir)
        result["eval_legend"] = TAGS
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.eval.beir:
        cutoffs = ("ndcg@10", "recall@10", "mrr@10", "map@10", f"recall@{r.top_k}")
        names = [f"{b.name or Path(b.path).name}/{m}" for b in cfg.eval.beir for m in cutoffs]
        print_table(
            result["eval"], [n for n in names if n in result["eval"]["biencoder"]], alpha=r.alpha, top_k=r.top_k
        )
    print(f"run directory: {run_dir}  (metrics.json, model/, runs/)  wall {result['wall_seconds']:.0f} s")
    return result


main = hydra_job("reranker", RerankerJobConfig, run)

if __name__ == "__main__":
    main()
