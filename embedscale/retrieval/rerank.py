"""Re-ranking a first-stage run with a cross-encoder, and fusing the two rankings.

A run is `{query_id: {doc_id: score}}` (what `RetrievalEvaluator.search` returns and `embedscale
evaluate` writes under runs/). `rerank_run` keeps each query's best `top_k` documents, in trec_eval's
order (retrieval/metrics.py), and replaces their scores with the cross-encoder's; every pair of every
query is scored in one `score_pairs` call, so batches are length-sorted over the whole run.

`interpolate_runs` is the safety net: a cross-encoder trained on a few hundred queries can rank worse
than the bi-encoder it re-ranks, while a mix of the two is rarely worse than either. Scores are
z-normalised per query before mixing (a logit and a cosine are on different scales).

This module never imports `contrastive/`: the cross-encoder comes from `encoder/`, like the bi-encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from embedscale.config import RerankerJobConfig

from embedscale.encoder.crossencoder import score_pairs
from embedscale.retrieval.metrics import rank

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def top_k_run(run: Mapping[str, Mapping[str, float]], top_k: int) -> Run:
    """Each query's best `top_k` documents (trec_eval order: score desc, then id desc), scores kept."""
    return {qid: {doc: float(scores[doc]) for doc in rank(scores)[:top_k]} for qid, scores in run.items()}


def rerank_run(
    run: Mapping[str, Mapping[str, float]],
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    model,
    tokenizer,
    *,
    top_k: int = 100,
    batch_size: int = 64,
    max_length: int | None = None,
    scorer: Callable[..., torch.Tensor] = score_pairs,
) -> Run:
    """Cross-encoder scores of each query's `top_k` documents of `run`.

    Args:
        run: first-stage run {qid: {docid: score}}; documents beyond a query's top_k are left out.
        queries, corpus: texts by id; every query and document of the kept run must be present.
        model, tokenizer: the cross-encoder (`load_cross_encoder`).
        max_length: token budget of a pair; None: the model's.
        scorer: `score_pairs` or a function with its signature (tests pass a fake).
    Returns:
        {qid: {docid: cross-encoder logit}} over the kept documents.
    """
    kept = top_k_run(run, top_k)
    missing_q = [qid for qid in kept if qid not in queries]
    missing_d = sorted({doc for docs in kept.values() for doc in docs if doc not in corpus})
    if missing_q or missing_d:
        raise ValueError(
            f"the run names {len(missing_q)} queries (e.g. {missing_q[:3]}) and {len(missing_d)} documents "
            f"(e.g. {missing_d[:3]}) missing from the queries/corpus given: re-rank a run of this dataset"
        )
    pairs = [(qid, doc) for qid, docs in kept.items() for doc in docs]
    short = sum(len(docs) < top_k for docs in kept.values())
    if short:
        log.info("%d of %d queries have fewer than top_k=%d documents in the run", short, len(kept), top_k)
    scores_N = scorer(
        model,
        tokenizer,
        [queries[qid] for qid, _ in pairs],
        [corpus[doc] for _, doc in pairs],
        batch_size=batch_size,
        max_length=max_length,
        progress=True,
    )
    out: Run = {qid: {} for qid in kept}
    for (qid, doc), score in zip(pairs, scores_N.tolist(), strict=True):
        out[qid][doc] = float(score)
    return out


def _z(scores: Mapping[str, float]) -> dict[str, float]:
    values = torch.tensor(list(scores.values()), dtype=torch.float64)
    std = values.std(unbiased=False).item() if len(values) > 1 else 0.0
    mean = values.mean().item() if len(values) else 0.0
    return {doc: (s - mean) / std if std > 0 else 0.0 for doc, s in scores.items()}


def interpolate_runs(
    first: Mapping[str, Mapping[str, float]], second: Mapping[str, Mapping[str, float]], *, alpha: float
) -> Run:
    """Per query: alpha x z(first) + (1 - alpha) x z(second), z-scored over that query's documents of `first`.

    A document of `first` missing from `second` is an error (re-rank first, then interpolate over its documents).
    """
    out: Run = {}
    for qid, docs in first.items():
        other = {doc: second.get(qid, {}).get(doc) for doc in docs}
        missing = [doc for doc, s in other.items() if s is None]
        if missing:
            raise ValueError(f"query {qid}: documents {missing[:3]} of the first run are missing from the second")
        z1, z2 = _z(docs), _z(other)
        out[qid] = {doc: alpha * z1[doc] + (1 - alpha) * z2[doc] for doc in docs}
    return out


RUN_TAGS = {
    "biencoder": "bi-encoder top-k (first stage alone)",
    "reranked": "cross-encoder alone, re-ordering the bi-encoder's top-k",
    "interpolated": "alpha x z(cross-encoder) + (1 - alpha) x z(bi-encoder), per query",
}


def evaluate_reranking(cfg: RerankerJobConfig, model, tokenizer, run_dir: Path) -> tuple[dict, dict]:
    """(metrics by tag, seconds by step) of the bi-encoder's top-k, re-ranked and interpolated, on eval.beir."""
    import dataclasses
    import json
    import time

    from embedscale.config import ModelConfig
    from embedscale.data.records import resolve_data_root, resolve_path
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.evaluator import build_evaluators
    from embedscale.retrieval.metrics import retrieval_metrics

    r = cfg.reranker
    root = resolve_data_root(cfg.data_root)
    biencoder = bi_tokenizer = None
    if not r.biencoder_runs:
        biencoder, bi_tokenizer = load_encoder(ModelConfig(name_or_path=r.biencoder))
    max_length = biencoder.cfg.document_max_length if biencoder is not None else r.max_length
    evaluators = build_evaluators(cfg.eval, root=root, default_max_length=max_length)
    metrics: dict[str, dict[str, float]] = {tag: {} for tag in RUN_TAGS}
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
