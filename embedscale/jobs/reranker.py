"""Job `embedscale reranker`: train a cross-encoder on query groups -> <run_dir>/model -> re-rank a bi-encoder's
top-k on BEIR sets -> metrics of the bi-encoder, the re-ranked and the interpolated runs -> metrics.json.

    embedscale reranker reranker.data=[/tmp/mined/scifact-bm25] reranker.num_negatives=7
    embedscale reranker reranker.train=false reranker.model=runs/reranker/<ts>/model

Three runs are reported per set, so that a cross-encoder is never judged alone: `biencoder` (the
first stage's top-k, unchanged), `reranked` (the same documents ordered by the cross-encoder alone)
and `interpolated` (alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder) per query). One process
only: the first-stage search after training is sharded over whatever ranks exist, and a
cross-encoder this size trains in minutes. Training: contrastive/reranker.py; re-ranking: retrieval/rerank.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from embedscale.config import RerankerJobConfig
from embedscale.jobs.launch import hydra_job


def print_table(metrics: dict[str, dict[str, float]], names: list[str], *, alpha: float, top_k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from embedscale.retrieval.rerank import RUN_TAGS

    table = Table(title=f"embedscale reranker: bi-encoder top-{top_k}, re-ranked by the cross-encoder")
    table.add_column("metric", no_wrap=True, min_width=max(map(len, names), default=6))  # never cut the name
    for col in ("biencoder", "reranked", "delta", f"interpolated a={alpha:g}", "delta"):
        table.add_column(col, justify="right")
    for name in names:
        b, c, m = (metrics[tag][name] for tag in RUN_TAGS)
        table.add_row(name, f"{b:.4f}", f"{c:.4f}", f"{c - b:+.4f}", f"{m:.4f}", f"{m - b:+.4f}")
    Console().print(table)
    for tag, what in RUN_TAGS.items():
        print(f"  {tag}: {what}")


def run(cfg: RerankerJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Train (unless reranker.train=false), save, evaluate re-ranking; returns what metrics.json holds."""
    from embedscale.contrastive.reranker import fit_reranker
    from embedscale.encoder.crossencoder import load_cross_encoder, save_cross_encoder
    from embedscale.export import to_jsonable
    from embedscale.retrieval.rerank import RUN_TAGS, evaluate_reranking
    from embedscale.runtime import start_run

    start = time.perf_counter()
    run_dir = start_run(
        Path(cfg.run_dir or run_dir or "runs/reranker"),
        seed=cfg.seed,
        num_threads=cfg.trainer.num_threads,
        allocator=str(cfg.trainer.host_allocator),
    )
    r = cfg.reranker
    model, tokenizer = load_cross_encoder(r.model, max_length=r.max_length)
    result: dict[str, Any] = {"run_dir": str(run_dir), "model": r.model, "config": to_jsonable(cfg)}
    if r.train:
        result["train"] = fit_reranker(cfg, model, tokenizer, run_dir)
        result["model_dir"] = str(save_cross_encoder(model, tokenizer, run_dir / "model"))
    elif model.new_parameters:
        raise ValueError(
            f"reranker.model={r.model} has no trained cross-encoder head ({', '.join(model.new_parameters)} would "
            "be random): point reranker.model at a trained cross-encoder, or train one (reranker.train=true)"
        )
    if cfg.eval.beir:
        result["biencoder"] = r.biencoder_runs or r.biencoder
        result["eval"], result["eval_seconds"] = evaluate_reranking(cfg, model, tokenizer, run_dir)
        result["eval_legend"] = RUN_TAGS
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


main = hydra_job("reranker", run)

if __name__ == "__main__":
    main()
