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

import torch

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
