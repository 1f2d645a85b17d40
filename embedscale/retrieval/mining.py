"""Hard-negative mining: candidates (dense, BM25, hybrid) -> filters -> selection, as plain functions.

The mining run (retrieval/miner.py) loads the data and the models; everything here takes arrays and lists (and
the `mine.*` settings), so each rule is testable on a five-document corpus with known answers.

Why each filter exists:
- a labelled positive of the query is never a negative (any split's qrels; for pair data, every
  positive given for the same query text), nor is a document whose *text* equals a positive or the
  query (corpora hold duplicates under different ids);
- the rank window skips the top ranks, where unlabelled relevant documents crowd (SciFact, MS MARCO:
  most "hard negatives" at rank 1-3 are false negatives) and stops before ranks that teach nothing;
- margins drop candidates that score too close to the positive: `margin` keeps score < positive - m,
  `relative_margin` keeps score < (1 - r) x positive (NV-Retriever's "TopK-PercPos" with r = 0.05);
- a cross-encoder, when given, drops candidates it scores as relevant (sigmoid(logit) >= threshold)
  or within `ce_margin` of its score for the positive.
The scores (retriever and cross-encoder, for the positive and every kept negative) are written with
the negatives, so later stages can distil from them or re-filter without mining again.

Legend: Q = queries, N = corpus documents, K = candidates per query.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from embedscale.config import MineConfig

REASONS = (
    "positive",  # a labelled positive of the query
    "same_text",  # same text as a positive or as the query
    "margin",  # score >= positive - margin
    "relative_margin",  # score >= (1 - relative_margin) x positive
    "cross_encoder",  # cross-encoder says relevant (threshold or ce_margin)
)


@dataclass
class Selection:
    """The negatives chosen for one sample, best rank first for `top`, in sampled order for `random`."""

    ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    ce_scores: list[float] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    beyond_window: int = 0


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the sample's key (not on order, ranks or workers)."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode())]))


def eligible(
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    *,
    positives: set[int],
    same_text: set[int],
    positive_score: float,
    spec: MineConfig,
) -> tuple[list[int], Counter]:
    """Ranks (positions in the candidate list) that pass the id, text and margin rules, in rank order.

    Counts every rejection inside the window by its first failing rule."""
    keep, why = [], Counter()
    for rank, (doc, score) in enumerate(zip(cand_ids.tolist(), cand_scores.tolist())):
        if doc < 0:  # faiss pads with -1 when the index holds fewer than K vectors
            break
        if rank < spec.window_start:
            continue
        in_window = rank < spec.window_end
        if not in_window and not spec.fill:
            break
        reason = None
        if doc in positives:
            reason = "positive"
        elif doc in same_text:
            reason = "same_text"
        elif spec.margin is not None and score >= positive_score - spec.margin:
            reason = "margin"
        elif spec.relative_margin is not None and score >= (1.0 - spec.relative_margin) * positive_score:
            reason = "relative_margin"
        if reason is None:
            keep.append(rank)
        elif in_window:
            why[reason] += 1
    return keep, why


def ce_rejects(ce_logit: float, ce_positive: float | None, spec: MineConfig) -> bool:
    if spec.ce_threshold is not None and 1.0 / (1.0 + np.exp(-ce_logit)) >= spec.ce_threshold:
        return True
    return spec.ce_margin is not None and ce_positive is not None and ce_logit >= ce_positive - spec.ce_margin


def select(
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    ranks: list[int],
    *,
    spec: MineConfig,
    rng: np.random.Generator,
    ce_logits: dict[int, float] | None = None,
    ce_positive: float | None = None,
) -> Selection:
    """Pick `spec.num_negatives` of the eligible `ranks` (from `eligible`): window first, then beyond it.

    `ce_logits` maps a rank to the cross-encoder logit of (query, candidate); ranks it rejects are
    skipped and counted."""
    out = Selection()
    in_window = [r for r in ranks if r < spec.window_end]
    beyond = [r for r in ranks if r >= spec.window_end]
    if spec.sample == "random":
        in_window = [in_window[i] for i in rng.permutation(len(in_window))]
    for pool, is_beyond in ((in_window, False), (beyond, True)):
        for rank in pool:
            if len(out.ids) == spec.num_negatives:
                return out
            if ce_logits is not None:
                if rank not in ce_logits:
                    continue  # not scored (beyond what the job sent to the cross-encoder)
                if ce_rejects(ce_logits[rank], ce_positive, spec):
                    if not is_beyond:
                        out.filtered["cross_encoder"] += 1
                    continue
                out.ce_scores.append(float(ce_logits[rank]))
            out.ids.append(int(cand_ids[rank]))
            out.scores.append(float(cand_scores[rank]))
            out.ranks.append(int(rank))
            out.beyond_window += int(is_beyond)
    return out


def fill_random(
    sel: Selection,
    num_negatives: int,
    *,
    corpus_size: int,
    excluded: set[int],
    rng: np.random.Generator,
    score=None,
    with_ce: bool = False,
) -> int:
    """Top `sel` up to `num_negatives` with uniformly random corpus documents (rank -1): never a positive,
    a same-text document or one already chosen. Random documents are almost never relevant, so this is
    the safe fallback when the filters leave a query too few candidates. Returns how many were added."""
    taken = set(sel.ids) | excluded
    added, tries = 0, 0
    while len(sel.ids) < num_negatives and tries < 50 * num_negatives and len(taken) < corpus_size:
        doc = int(rng.integers(corpus_size))
        tries += 1
        if doc in taken:
            continue
        taken.add(doc)
        sel.ids.append(doc)
        sel.scores.append(score(doc) if score is not None else None)
        sel.ranks.append(-1)
        if with_ce:
            sel.ce_scores.append(None)  # not scored by the cross-encoder
        added += 1
    return added


def rrf_fuse(runs: list[tuple[np.ndarray, np.ndarray]], depth: int, *, k: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-rank fusion of several (ids (Q, K), scores) runs -> (ids (Q, depth), fused scores).

    Hybrid mining ranks the union of BM25 and dense candidates by sum 1 / (k + rank); a document in
    both lists rises. Rows shorter than `depth` are padded with -1."""
    q = runs[0][0].shape[0]
    ids_QK = np.full((q, depth), -1, dtype=np.int64)
    fused_QK = np.zeros((q, depth), dtype=np.float32)
    for row in range(q):
        score: dict[int, float] = {}
        for ids, _ in runs:
            for rank, doc in enumerate(ids[row].tolist()):
                if doc >= 0:
                    score[doc] = score.get(doc, 0.0) + 1.0 / (k + rank + 1)
        best = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
        ids_QK[row, : len(best)] = [d for d, _ in best]
        fused_QK[row, : len(best)] = [s for _, s in best]
    return ids_QK, fused_QK


class BM25:
    """BM25 over a corpus with `bm25s` (English stemming and stop words when PyStemmer is installed)."""

    def __init__(self, texts: list[str], *, language: str = "en") -> None:
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its index build logs at DEBUG per call
        try:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("english") if language == "en" else None
        except ImportError:  # pragma: no cover - PyStemmer is a dependency; this only keeps bm25s usable without it
            self.stemmer = None
        self.language = language
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize(texts), show_progress=False)
        self.size = len(texts)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords=self.language, stemmer=self.stemmer, return_ids=False, show_progress=False
        )

    def search(
        self, queries: list[str], k: int, *, score_docs: list[list[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
        """(ids (Q, K) int64, scores (Q, K) float32, scores of `score_docs[q]` per query).

        ids are corpus positions; -1 pads ranks whose documents share no term with the query."""
        k = min(k, self.size)
        ids_QK = np.full((len(queries), k), -1, dtype=np.int64)
        scores_QK = np.zeros((len(queries), k), dtype=np.float32)
        extra: list[list[float]] = []
        vocab = self.retriever.vocab_dict
        for row, tokens in enumerate(self._tokenize(queries)):
            known = [t for t in tokens if t in vocab]
            s_N = self.retriever.get_scores(known) if known else np.zeros(self.size, dtype=np.float32)
            top = np.argpartition(-s_N, k - 1)[:k] if k < self.size else np.arange(self.size)
            top = top[np.lexsort((top, -s_N[top]))]  # by score, ties by position: deterministic
            top = top[s_N[top] > 0]
            ids_QK[row, : len(top)] = top
            scores_QK[row, : len(top)] = s_N[top]
            extra.append([float(s_N[d]) for d in (score_docs[row] if score_docs else [])])
        return ids_QK, scores_QK, extra
