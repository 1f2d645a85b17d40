"""Ranking metrics as pure functions, with trec_eval's semantics (what BEIR and MTEB report).

- Ranking: by score descending; ties broken by document id descending, as trec_eval does.
- Relevant: qrel relevance >= 1. NDCG gain is the relevance itself (not 2^rel - 1) with a log2
  discount; the ideal ranking is built from every judged document of the query.
- Recall@k: relevant documents in the top k / all relevant documents of the query.
- MAP@k (trec `map_cut`): sum of precision at each relevant rank <= k, over all relevant documents.
- MRR@k: 1 / rank of the first relevant document within the top k, else 0.
- Every metric is the mean over the queries of the qrels that have at least one relevant document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def rank(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first, trec_eval order (score desc, then id desc)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(ranking: list[str], judged: Mapping[str, int], k_values: Iterable[int]) -> dict[str, float]:
    relevant = {doc for doc, rel in judged.items() if rel >= 1}
    ideal = sorted((rel for rel in judged.values() if rel > 0), reverse=True)
    out: dict[str, float] = {}
    for k in k_values:
        top = ranking[:k]
        dcg = sum(judged.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(top) if judged.get(doc, 0) > 0)
        idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal[:k]))
        hits = [i for i, doc in enumerate(top) if doc in relevant]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / len(relevant)
        out[f"map@{k}"] = sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
    return out


def retrieval_metrics(run: Run, qrels: Qrels, k_values: Iterable[int]) -> dict[str, float]:
    """Mean of each metric over the judged queries; a judged query missing from the run scores 0."""
    k_values = sorted(set(k_values))
    per_query = [
        query_metrics(rank(run.get(qid, {})), judged, k_values)
        for qid, judged in qrels.items()
        if any(rel >= 1 for rel in judged.values())
    ]
    if not per_query:
        raise ValueError("the qrels hold no query with a relevant document (relevance >= 1)")
    return {name: sum(m[name] for m in per_query) / len(per_query) for name in per_query[0]}
