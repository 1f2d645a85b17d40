"""Evaluators that share the encoder: BEIR-layout retrieval (exact search) and STS (Spearman).

An evaluator is built once from files (`from_beir`, `from_pairs`, `from_sts`) and called with an encoder:
`evaluator(encoder, tokenizer) -> {name/metric: value}`. Corpus embeddings are cached on disk,
keyed by the document tower's weights, the encoding settings and the corpus content, so the
"before" evaluation of a published model is paid once per machine, not once per run.

Legend: Q = queries, N = corpus documents, D = dim, K = top k.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from embedscale.data.records import read_corpus, read_qrels, read_queries, read_sts
from embedscale.distributed import broadcast_object, world
from embedscale.encoder.biencoder import BiEncoder
from embedscale.retrieval.encode import encode_corpus, encode_sharded
from embedscale.retrieval.metrics import retrieval_metrics
from embedscale.runtime import default_cache_dir

log = logging.getLogger(__name__)


def exact_search(q_QD: torch.Tensor, docs_ND: torch.Tensor, k: int, *, chunk: int = 1024):
    """Exact inner-product top-k, in chunks of queries: (scores (Q, K), indices (Q, K))."""
    k = min(k, docs_ND.shape[0])
    scores, indices = [], []
    for start in range(0, q_QD.shape[0], chunk):
        s_qN = q_QD[start : start + chunk] @ docs_ND.T
        top = s_qN.topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)


@dataclass
class RetrievalEvaluator:
    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    k_values: tuple[int, ...] = (1, 3, 5, 10, 100)
    batch_size: int = 64
    max_length: int | None = None
    cache_dir: Path | None = None
    query_prefix: str | None = None
    """The task's query instruction, instead of the model's query prefix; None: the model's."""
    maxsim_candidates: int = 0
    """Multi-vector models: 0 exact MaxSim search; n > 0 candidates from each query token's n nearest token vectors."""

    @classmethod
    def from_beir(
        cls, dataset_dir: Path, split: str, *, name: str | None = None, missing_documents: str = "raise", **kwargs
    ) -> RetrievalEvaluator:
        qrels = read_qrels(dataset_dir, split)
        all_queries = read_queries(dataset_dir)
        missing = [qid for qid in qrels if qid not in all_queries]
        if missing:
            raise ValueError(
                f"{dataset_dir}/qrels/{split}.tsv names {len(missing)} queries missing from queries.jsonl "
                f"(e.g. {missing[0]!r}): fix the qrels or the queries"
            )
        queries = {qid: all_queries[qid] for qid in qrels}
        corpus = read_corpus(dataset_dir)
        absent = sorted({did for docs in qrels.values() for did in docs if did not in corpus})
        if absent:
            message = (
                f"{dataset_dir}/qrels/{split}.tsv judges {len(absent)} document(s) missing from corpus.jsonl "
                f"(e.g. {absent[:3]}): they can never be retrieved"
            )
            if str(missing_documents) == "raise":
                raise ValueError(f"{message}; fix the corpus or qrels, or set eval.missing_documents=warn")
            log.warning("%s (eval.missing_documents=warn: their judgments are kept, as trec_eval counts them)", message)
        return cls(name or dataset_dir.name, queries, corpus, qrels, **kwargs)

    @classmethod
    def from_pairs(cls, path: Path, *, name: str, max_pairs: int, seed: int, **kwargs) -> RetrievalEvaluator:
        """Retrieval from a (query, positive) JSONL file (eval.pairs): `max_pairs` pairs sampled with `seed` (0:
        all); the corpus is their distinct positives, each distinct query is relevant to every positive it was
        paired with in the sample."""
        import hashlib
        import random

        from embedscale.data.records import iter_jsonl

        rows = []
        for line_no, row in iter_jsonl(path):
            query, positive = row.get("query"), row.get("positive")
            if not (isinstance(query, str) and query.strip() and isinstance(positive, str) and positive.strip()):
                raise ValueError(
                    f"{path}:{line_no}: eval.pairs needs non-empty string fields 'query' and 'positive' on every line"
                )
            rows.append((query, positive))
        if not rows:
            raise ValueError(f"{path}: no pairs: eval.pairs needs a JSONL file of {{query, positive}} lines")
        if 0 < max_pairs < len(rows):
            rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_pairs))]
        key = lambda text: hashlib.sha1(text.encode()).hexdigest()[:16]  # noqa: E731 - ids stable across runs
        queries = {f"q{key(q)}": q for q, _ in rows}
        corpus = {f"d{key(d)}": d for _, d in rows}
        qrels: dict[str, dict[str, int]] = {}
        for q, d in rows:
            qrels.setdefault(f"q{key(q)}", {})[f"d{key(d)}"] = 1
        return cls(name, queries, corpus, qrels, **kwargs)

    def late_interaction_run(self, encoder: BiEncoder, tokenizer) -> tuple[dict[str, dict[str, float]], dict]:
        """A multi-vector model's run by MaxSim search (retrieval/late_interaction.py: exact, or over candidates with
        maxsim_candidates), and what the index holds: bytes per document (and candidates per query). Computed whole
        on every rank that calls it (no collectives; not sharded yet)."""
        from embedscale.retrieval.late_interaction import candidate_search, encode_token_matrices, maxsim_search

        doc_ids, qids = list(self.corpus), list(self.queries)
        docs = encode_token_matrices(
            encoder,
            tokenizer,
            [self.corpus[i] for i in doc_ids],
            side="document",
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        queries = encode_token_matrices(  # at the model's query length: the augmentation pads to it
            encoder,
            tokenizer,
            [self.queries[q] for q in qids],
            side="query",
            batch_size=self.batch_size,
            prefix=self.query_prefix,
        )
        info = {"index_bytes_per_doc": docs.bytes_per_text}
        if self.maxsim_candidates:
            scores_QK, idx_QK, per_query = candidate_search(
                queries, docs, max(self.k_values), per_token=self.maxsim_candidates
            )
            info["maxsim_candidates_per_query"] = per_query
        else:
            scores_QK, idx_QK = maxsim_search(queries, docs, max(self.k_values))
        run = {
            qid: {doc_ids[j]: float(s) for s, j in zip(scores_QK[row].tolist(), idx_QK[row].tolist()) if j >= 0}
            for row, qid in enumerate(qids)
        }
        return run, info

    def _corpus_embeddings(self, encoder: BiEncoder, tokenizer) -> torch.Tensor:
        ids = list(self.corpus)
        return encode_corpus(
            encoder,
            tokenizer,
            ids,
            [self.corpus[i] for i in ids],
            batch_size=self.batch_size,
            max_length=self.max_length,
            cache_dir=self.cache_dir,
        )

    def embeddings(self, encoder: BiEncoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (Q, D) in `self.queries` order, corpus (N, D) in `self.corpus` order); the corpus from
        the cache when this model encoded it before. Sweeps (retrieval/quantize.py) call it once and
        truncate or quantise the result, instead of searching once per setting."""
        if encoder.cfg.multivector:
            raise ValueError(
                "a model.multivector model has token matrices, not one embedding per text: its evaluation is "
                "exact MaxSim search (RetrievalEvaluator.__call__); sweeps and single-vector indexes do not apply"
            )
        qids = list(self.queries)
        docs_ND = self._corpus_embeddings(encoder, tokenizer)
        q_QD = encode_sharded(
            encoder,
            tokenizer,
            [self.queries[q] for q in qids],
            side="query",
            batch_size=self.batch_size,
            max_length=self.max_length,
            prefix=self.query_prefix,
        )
        return q_QD, docs_ND

    def search(self, encoder: BiEncoder, tokenizer, *, dim: int | None = None) -> dict[str, dict[str, float]]:
        """Run of the top max(k_values) documents per query: {query_id: {doc_id: score}}."""
        q_QD, docs_ND = self.embeddings(encoder, tokenizer)
        return self.rank(q_QD, docs_ND, normalize=encoder.cfg.normalize, dim=dim)

    def rank(
        self, q_QD: torch.Tensor, docs_ND: torch.Tensor, *, normalize: bool, dim: int | None = None
    ) -> dict[str, dict[str, float]]:
        """Exact search of given embeddings (local: no collectives) -> run {query_id: {doc_id: score}}."""
        from embedscale.encoder.biencoder import truncate

        doc_ids = list(self.corpus)
        qids = list(self.queries)
        scores_QK, idx_QK = exact_search(
            truncate(q_QD, dim, normalize=normalize), truncate(docs_ND, dim, normalize=normalize), max(self.k_values)
        )
        return {
            qid: {doc_ids[j]: float(s) for s, j in zip(scores_QK[row].tolist(), idx_QK[row].tolist())}
            for row, qid in enumerate(qids)
        }

    def __call__(self, encoder: BiEncoder, tokenizer, *, run_path: Path | None = None) -> dict[str, float]:
        """Metrics of this set. Every rank of a process group must call it (encoding is sharded); the
        metrics are computed once, on rank 0, and broadcast; rank 0 writes the run file. A multi-vector model:
        exact MaxSim search on every rank (not sharded), plus `<name>/index_bytes_per_doc`."""
        if encoder.cfg.multivector:
            run, info = self.late_interaction_run(encoder, tokenizer)
            if world()[0] == 0 and run_path is not None:
                run_path.parent.mkdir(parents=True, exist_ok=True)
                run_path.write_text(json.dumps(run))
            metrics = {f"{self.name}/{k}": v for k, v in retrieval_metrics(run, self.qrels, self.k_values).items()}
            return {**metrics, **{f"{self.name}/{k}": v for k, v in info.items()}}
        q_QD, docs_ND = self.embeddings(encoder, tokenizer)  # every rank: the encoding is sharded
        metrics = None
        if world()[0] == 0:  # the search and the metrics once
            run = self.rank(q_QD, docs_ND, normalize=encoder.cfg.normalize)
            if run_path is not None:
                run_path.parent.mkdir(parents=True, exist_ok=True)
                run_path.write_text(json.dumps(run))
            metrics = {f"{self.name}/{k}": v for k, v in retrieval_metrics(run, self.qrels, self.k_values).items()}
        return broadcast_object(metrics)


@dataclass
class STSEvaluator:
    name: str
    left: list[str]
    right: list[str]
    scores: list[float]
    batch_size: int = 64
    max_length: int | None = None
    query_prefix: str | None = None

    @classmethod
    def from_sts(cls, path: Path, *, name: str | None = None, **kwargs) -> STSEvaluator:
        left, right, scores = read_sts(path)
        return cls(name or path.parent.name, left, right, scores, **kwargs)

    def __call__(self, encoder: BiEncoder, tokenizer, *, run_path: Path | None = None) -> dict[str, float]:
        """Spearman (x100 is what papers print; we keep [-1, 1]) of cosine similarity vs the gold scores."""
        from scipy.stats import spearmanr

        if encoder.cfg.multivector:  # symmetric mean MaxSim, computed on every rank (retrieval/late_interaction.py)
            from embedscale.retrieval.late_interaction import sts_scores

            similarity = sts_scores(
                encoder, tokenizer, self.left, self.right, batch_size=self.batch_size, max_length=self.max_length
            )
            return {f"{self.name}/spearman": float(spearmanr(similarity, self.scores).statistic)}
        kwargs = dict(side="query", batch_size=self.batch_size, max_length=self.max_length, prefix=self.query_prefix)
        a_ND = torch.nn.functional.normalize(encode_sharded(encoder, tokenizer, self.left, **kwargs), dim=-1)
        b_ND = torch.nn.functional.normalize(encode_sharded(encoder, tokenizer, self.right, **kwargs), dim=-1)
        cosine = (a_ND * b_ND).sum(-1).tolist()
        metrics = None
        if world()[0] == 0:
            metrics = {f"{self.name}/spearman": float(spearmanr(cosine, self.scores).statistic)}
        return broadcast_object(metrics)


def build_evaluators(cfg, *, root: Path, default_max_length: int) -> list[RetrievalEvaluator | STSEvaluator]:
    """Evaluators for every BEIR, pairs and STS set of an `EvalConfig`, paths relative to the data root."""
    from embedscale.data.records import resolve_path

    max_length = cfg.max_length or default_max_length
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    retrieval = dict(  # what every retrieval set shares, BEIR or pairs
        k_values=tuple(cfg.k_values),
        batch_size=cfg.batch_size,
        max_length=max_length,
        cache_dir=cache_dir,
        maxsim_candidates=cfg.maxsim_candidates,
    )
    evaluators: list[RetrievalEvaluator | STSEvaluator] = [
        RetrievalEvaluator.from_beir(
            resolve_path(s.path, root),
            s.split,
            name=s.metric_name,
            query_prefix=s.query_prefix,
            missing_documents=cfg.missing_documents,
            **retrieval,
        )
        for s in cfg.beir
    ]
    evaluators += [
        RetrievalEvaluator.from_pairs(
            resolve_path(s.path, root),
            name=s.metric_name,
            max_pairs=s.max_pairs,
            seed=s.seed,
            query_prefix=s.query_prefix,
            **retrieval,
        )
        for s in cfg.pairs
    ]
    evaluators += [
        STSEvaluator.from_sts(
            resolve_path(s.path, root),
            name=s.metric_name,
            batch_size=cfg.batch_size,
            max_length=max_length,
            query_prefix=s.query_prefix,
        )
        for s in cfg.sts
    ]
    return evaluators


def evaluate_all(evaluators, encoder: BiEncoder, tokenizer, *, run_dir: Path | None = None, tag: str = "") -> dict:
    """Run every evaluator; BEIR runs are written to <run_dir>/runs/<name><tag>.json when run_dir is given."""
    metrics: dict[str, float] = {}
    for ev in evaluators:
        run_path = run_dir / "runs" / f"{ev.name}{tag}.json" if run_dir is not None else None
        metrics.update(ev(encoder, tokenizer, run_path=run_path if isinstance(ev, RetrievalEvaluator) else None))
    return metrics
