"""A mining run: (query, positive) data + corpus -> candidates (dense/BM25/hybrid) -> filters -> training shards.

`mine(cfg)` is what `embedscale mine` runs (embedscale/jobs/mine.py); the rules it applies are the plain
functions of retrieval/mining.py. Under torchrun the corpus and queries are encoded over all ranks
(retrieval/encode.py); search, selection and writing happen on rank 0.

The output is a sharded dataset in the training format (`data.format=shards`); every sample also carries the
scores and ranks of its positive and negatives, and the manifest records the mining model (its path, checkpoint
and weight fingerprint), the index, the parameters and the counts (kept, filtered by which rule, taken past the
window). See docs/mining.md.

Legend: Q = unique queries, N = corpus documents, K = candidates per query, D = dim.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedscale.config import MineJobConfig, MineMethod
from embedscale.data.batch import PairExample
from embedscale.data.records import Fields, pairs, read_corpus, read_corpus_texts, read_qrels, resolve_path


class MiningData:
    """Samples, the corpus (ids and texts) and, per sample, the corpus positions that are its positives."""

    def __init__(self) -> None:
        self.samples: list[PairExample] = []
        self.doc_ids: list[str] = []
        self.doc_texts: list[str] = []
        self.positive_of: list[int] = []  # corpus position of each sample's own positive
        self.positives_of_query: dict[str, set[int]] = {}  # query text -> every labelled positive
        self._by_text: dict[str, list[int]] = {}

    def add_doc(self, doc_id: str, text: str) -> int:
        self.doc_ids.append(doc_id)
        self.doc_texts.append(text)
        self._by_text.setdefault(text, []).append(len(self.doc_ids) - 1)
        return len(self.doc_ids) - 1

    def positions_of_text(self, text: str) -> list[int]:
        return self._by_text.get(text, [])


def _shard_records(path: Path):
    from embedscale.data.shards import ShardedDataset

    ds = ShardedDataset.open(path)
    for shard, meta in enumerate(ds.shards):
        for row in ds.read(shard, range(meta["samples"])):
            yield PairExample(row["query"], row["positive"], list(row.get("negatives") or []), row.get("key", ""))


def load_mining_data(c, root: Path) -> MiningData:
    """The samples to mine for and the corpus to mine from (mine.input / mine.format / mine.corpus)."""
    path = resolve_path(c.input, root)
    if not path.exists():
        raise ValueError(f"mine.input: {path} does not exist (data root {root}); fix the path or data_root")
    data = MiningData()
    if c.format == "beir":
        position = {doc_id: data.add_doc(doc_id, text) for doc_id, text in read_corpus(path).items()}
        labelled: dict[str, set[str]] = {}
        for split_file in sorted((path / "qrels").glob("*.tsv")):  # a positive in any split is never a negative
            for qid, docs in read_qrels(path, split_file.stem).items():
                labelled.setdefault(qid, set()).update(d for d, rel in docs.items() if rel > 0)
        for rec in pairs("beir", path, Fields(section="mine"), split=c.split):
            qid, did = rec.key.split(":", 1)
            data.samples.append(rec)
            data.positive_of.append(position[did])
            known = data.positives_of_query.setdefault(rec.query, set())
            known.update(position[d] for d in labelled.get(qid, ()) if d in position)
    else:
        if c.format == "shards":
            records = _shard_records(path)
        else:
            fields = Fields(c.query_field, c.positive_field, c.negatives_field, section="mine")
            records = pairs(str(c.format), path, fields, split=c.split)
        for rec in records:
            same = data.positions_of_text(rec.positive)
            pos = same[0] if same else data.add_doc(f"positive:{len(data.doc_ids)}", rec.positive)
            data.samples.append(rec)
            data.positive_of.append(pos)
            data.positives_of_query.setdefault(rec.query, set()).add(pos)
    if c.corpus:
        for doc_id, text in read_corpus_texts(resolve_path(c.corpus, root)):
            data.add_doc(doc_id, text)
    if not data.samples:
        raise ValueError(f"mine.input: {path} holds no (query, positive) samples (split {c.split!r})")
    return data


def _refused_global(err: Exception) -> str:
    """The line of torch's weights_only refusal that names what it refused (its message is a page long)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")[:200]


def load_biencoder(cfg: MineJobConfig):
    """The mining model: model.* (an export or a hub model), with mine.checkpoint's weights when given."""
    from embedscale.checkpoints import read_model_state
    from embedscale.encoder.biencoder import load_encoder

    encoder, tokenizer = load_encoder(cfg.model)
    if cfg.mine.checkpoint:
        try:
            model_state = read_model_state(cfg.mine.checkpoint)  # a file, or the shards of an fsdp2 run
        except pickle.UnpicklingError as err:  # weights_only refused an object: never unpickle it
            raise ValueError(
                f"mine.checkpoint={cfg.mine.checkpoint} holds objects other than tensors and plain containers, which "
                f"could run code when loaded; it is refused. Give a Lightning checkpoint written by embedscale train "
                f"(runs/train/<time>/checkpoints/*.ckpt). torch: {_refused_global(err)}"
            ) from err
        state = {k.removeprefix("encoder."): v for k, v in model_state.items() if k.startswith("encoder.")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.startswith("document_backbone.")]:
            raise ValueError(
                f"mine.checkpoint={cfg.mine.checkpoint} does not match model.name_or_path={cfg.model.name_or_path} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): give the model the checkpoint was trained from"
            )
    if torch.cuda.is_available():
        encoder.to(torch.device("cuda", torch.cuda.current_device()))
    return encoder, tokenizer


@dataclass
class Candidates:
    """Each unique query's ranked candidates (rank 0 only; `ids` None elsewhere) and what scored them."""

    ids: np.ndarray | None  # (Q, K) corpus positions, -1 past the corpus
    scores: np.ndarray | None  # (Q, K)
    q_QD: torch.Tensor | None = None  # dense query embeddings (dense, hybrid)
    docs_ND: torch.Tensor | None = None  # dense corpus embeddings (dense, hybrid)
    bm25_positive: dict = field(default_factory=dict)  # (query, doc) -> BM25 score of labelled positives
    model: dict = field(default_factory=dict)  # the mining model's provenance (dense, hybrid)
    late: tuple | None = None  # a multi-vector model's (queries, corpus) TokenMatrices instead of q_QD, docs_ND

    def positive_score(self, method: MineMethod, query_row: int, query: str, doc: int) -> float:
        if method == MineMethod.bm25:
            return self.bm25_positive[(query, doc)]
        return self.pair_score(query_row, doc)

    def pair_score(self, query_row: int, doc: int) -> float:
        """The mining model's score of (query, document): the inner product, or MaxSim for a multi-vector model."""
        if self.late is None:
            return float(self.q_QD[query_row] @ self.docs_ND[doc])
        from embedscale.retrieval.late_interaction import maxsim_block

        queries, docs = self.late
        q, q_mask = queries.padded(slice(query_row, query_row + 1))
        d, d_mask = docs.padded(slice(doc, doc + 1))
        return float(maxsim_block(q, q_mask, d, d_mask)[0, 0])


def dense_candidates(cfg: MineJobConfig, data: MiningData, queries: list[str], timings: dict):
    """(ids (Q, K), scores (Q, K), query embeddings (Q, D), doc embeddings (N, D), model fingerprint) on every rank
    (ids and scores on rank 0 only)."""
    from embedscale.distributed import world
    from embedscale.retrieval.encode import encode_corpus, encode_sharded
    from embedscale.retrieval.index import build_index, search
    from embedscale.runtime import default_cache_dir

    c = cfg.mine
    encoder, tokenizer = load_biencoder(cfg)
    if encoder.cfg.multivector:
        return late_interaction_candidates(encoder, tokenizer, c, data, queries, timings)
    start = time.perf_counter()
    cache = Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir()
    docs_ND = encode_corpus(
        encoder,
        tokenizer,
        data.doc_ids,
        data.doc_texts,
        batch_size=c.batch_size,
        max_length=c.max_length,
        cache_dir=cache,
    )
    q_QD = encode_sharded(encoder, tokenizer, queries, side="query", batch_size=c.batch_size)
    timings["encode_s"] = round(time.perf_counter() - start, 2)
    fingerprint = encoder.fingerprint("document")
    if world()[0] != 0:
        return None, None, q_QD, docs_ND, fingerprint
    start = time.perf_counter()
    index = build_index(docs_ND, cfg.index, seed=c.seed)
    timings["index_build_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    scores, ids = search(index, q_QD, c.candidates)
    timings["search_s"] = round(time.perf_counter() - start, 3)
    return ids, scores, q_QD, docs_ND, fingerprint


def late_interaction_candidates(encoder, tokenizer, c, data: MiningData, queries: list[str], timings: dict):
    """dense_candidates for a multi-vector model: exact MaxSim search (retrieval/late_interaction.py), computed whole
    on every rank; the embeddings' place holds the (queries, corpus) TokenMatrices."""
    from embedscale.distributed import world
    from embedscale.retrieval.late_interaction import encode_token_matrices, maxsim_search

    start = time.perf_counter()
    docs = encode_token_matrices(
        encoder, tokenizer, data.doc_texts, side="document", batch_size=c.batch_size, max_length=c.max_length
    )
    q = encode_token_matrices(encoder, tokenizer, queries, side="query", batch_size=c.batch_size)
    timings["encode_s"] = round(time.perf_counter() - start, 2)
    fingerprint = encoder.fingerprint("document")
    if world()[0] != 0:
        return None, None, (q, docs), None, fingerprint
    start = time.perf_counter()
    scores, ids = maxsim_search(q, docs, min(c.candidates, len(docs)))
    timings["search_s"] = round(time.perf_counter() - start, 3)
    ids_QK = np.full((len(q), c.candidates), -1, dtype=np.int64)
    scores_QK = np.full((len(q), c.candidates), -np.inf, dtype=np.float32)
    ids_QK[:, : ids.shape[1]], scores_QK[:, : ids.shape[1]] = ids.numpy(), scores.numpy()
    return ids_QK, scores_QK, (q, docs), None, fingerprint


def find_candidates(cfg: MineJobConfig, data: MiningData, queries: list[str], timings: dict) -> Candidates:
    """mine.method's candidates: dense (faiss), bm25 (bm25s) or hybrid (RRF of both, scored by the dense model)."""
    from embedscale.distributed import world
    from embedscale.retrieval.mining import BM25, rrf_fuse

    c = cfg.mine
    out = Candidates(None, None)
    dense = bm25 = None
    if c.method in (MineMethod.dense, MineMethod.hybrid):
        ids, scores, out.q_QD, out.docs_ND, fingerprint = dense_candidates(cfg, data, queries, timings)
        if isinstance(out.q_QD, tuple):  # a multi-vector model: token matrices, scored by MaxSim
            out.late, out.q_QD = out.q_QD, None
        dense = (ids, scores)
        out.model = {"name_or_path": cfg.model.name_or_path, "checkpoint": c.checkpoint, "fingerprint": fingerprint}
    if world()[0] != 0:
        return out
    if c.method in (MineMethod.bm25, MineMethod.hybrid):
        start = time.perf_counter()
        index = BM25(data.doc_texts)
        positives = [sorted(data.positives_of_query[q]) for q in queries]
        ids, scores, pos_scores = index.search(queries, c.candidates, score_docs=positives)
        bm25 = (ids, scores)
        out.bm25_positive = {(q, d): s for q, ds, ss in zip(queries, positives, pos_scores) for d, s in zip(ds, ss)}
        timings["bm25_s"] = round(time.perf_counter() - start, 3)
    if c.method == MineMethod.hybrid:
        out.ids, _ = rrf_fuse([dense, bm25], c.candidates)
        safe = np.maximum(out.ids, 0)
        if out.late is None:
            out.scores = torch.einsum("qd,qkd->qk", out.q_QD, out.docs_ND[torch.from_numpy(safe)]).numpy()
        else:
            out.scores = np.array([[out.pair_score(q, d) for d in row] for q, row in enumerate(safe.tolist())])
        out.scores[out.ids < 0] = -np.inf
    else:
        out.ids, out.scores = dense if c.method == MineMethod.dense else bm25
    return out


def cross_encoder_scores(cfg: MineJobConfig, pairs_qd: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """mine.cross_encoder's logit for every (query, document) pair."""
    from embedscale.encoder.crossencoder import load_cross_encoder, score_pairs

    c = cfg.mine
    model, tokenizer = load_cross_encoder(c.cross_encoder, max_length=c.ce_max_length)
    if model.new_parameters:
        raise ValueError(
            f"mine.cross_encoder={c.cross_encoder} has no trained relevance head "
            f"({', '.join(model.new_parameters[:2])} were initialised fresh): "
            "train one with `embedscale reranker` and pass its model/ directory"
        )
    unique = sorted(set(pairs_qd))
    logits = score_pairs(
        model,
        tokenizer,
        [q for q, _ in unique],
        [d for _, d in unique],
        batch_size=c.ce_batch_size,
        max_length=c.ce_max_length,
        progress=True,
    )
    return dict(zip(unique, logits.tolist()))


def _eligibility(cfg: MineJobConfig, data: MiningData, cand: Candidates, qrow: dict) -> tuple[list, list]:
    """Per sample: (eligible ranks, filtered-by-reason, positive's score), and the corpus positions sharing a text
    with its query or positives."""
    from embedscale.retrieval.mining import eligible

    c = cfg.mine
    plans, same_of = [], []
    for i, rec in enumerate(data.samples):
        row = qrow[rec.query]
        same = {
            p
            for t in (rec.query, *(data.doc_texts[d] for d in data.positives_of_query[rec.query]))
            for p in data.positions_of_text(t)
        }
        pos_score = cand.positive_score(c.method, row, rec.query, data.positive_of[i])
        ranks, why = eligible(
            cand.ids[row],
            cand.scores[row],
            positives=data.positives_of_query[rec.query],
            same_text=same,
            positive_score=pos_score,
            spec=c,
        )
        plans.append((ranks, why, pos_score))
        same_of.append(same)
    return plans, same_of


def _window_pairs(c, data: MiningData, cand: Candidates, qrow: dict, plans: list) -> list[tuple[str, str]]:
    """The (query, document) pairs a cross-encoder must score: each sample's window (and the fill past it), and
    its positive."""
    out = []
    for i, (ranks, _, _) in enumerate(plans):
        rec = data.samples[i]
        row = qrow[rec.query]
        window = [r for r in ranks if r < c.window_end] + [r for r in ranks if r >= c.window_end][: c.num_negatives]
        out += [(rec.query, data.doc_texts[cand.ids[row][r]]) for r in window]
        out.append((rec.query, rec.positive))
    return out


def write_mined(cfg: MineJobConfig, data, cand: Candidates, qrow: dict, plans, same_of, ce, out: Path, name: str):
    """Select each sample's negatives and write them as shards; (shards, counts, filtered, (k_min, k_max))."""
    from embedscale.data.shards import ShardWriter
    from embedscale.retrieval.mining import fill_random, sample_rng, select

    c = cfg.mine
    writer = ShardWriter(out, f"{name}-000", max_bytes=int(c.target_mb * 2**20))
    filtered, counts = Counter(), Counter()
    k_min, k_max = None, 0
    for i, (rec, (ranks, why, pos_score)) in enumerate(zip(data.samples, plans, strict=True)):
        row = qrow[rec.query]
        ce_logits = ce_positive = None
        if ce is not None:
            texts = {r: data.doc_texts[cand.ids[row][r]] for r in ranks}
            ce_logits = {r: ce[(rec.query, t)] for r, t in texts.items() if (rec.query, t) in ce}
            ce_positive = ce[(rec.query, rec.positive)]
        key = f"{name}-000-{i:09d}"
        rng = sample_rng(c.seed, rec.key or key)
        sel = select(
            cand.ids[row], cand.scores[row], ranks, spec=c, rng=rng, ce_logits=ce_logits, ce_positive=ce_positive
        )
        if len(sel.ids) < c.num_negatives and c.random_fill:
            score = None if c.method == MineMethod.bm25 else (lambda d, r=row: cand.pair_score(r, d))
            counts["random_fill"] += fill_random(
                sel,
                c.num_negatives,
                corpus_size=len(data.doc_ids),
                excluded=data.positives_of_query[rec.query] | same_of[i],
                rng=rng,
                score=score,
                with_ce=ce is not None,
            )
        filtered.update(why)
        filtered.update(sel.filtered)
        counts["beyond_window"] += sel.beyond_window
        counts["negatives"] += len(sel.ids)
        if len(sel.ids) < c.num_negatives:
            counts["samples_with_fewer"] += 1
            if not c.allow_fewer:
                raise ValueError(
                    f"sample {rec.key or i} (query {rec.query[:60]!r}) has only {len(sel.ids)} eligible negatives of "
                    f"mine.num_negatives={c.num_negatives} in {c.candidates} candidates after the filters: "
                    "raise mine.depth or mine.window_end, loosen the margins, or set mine.allow_fewer=true"
                )
        sample = {
            "key": key,
            "query": rec.query,
            "positive": rec.positive,
            "negatives": [data.doc_texts[d] for d in sel.ids],
            "source": name,
            "origin": rec.key,
            "positive_score": pos_score,
            "negative_scores": sel.scores,
            "negative_ranks": sel.ranks,
            "negative_ids": [data.doc_ids[d] for d in sel.ids],
        }
        if ce is not None:
            sample["positive_ce_score"] = ce_positive
            sample["negative_ce_scores"] = sel.ce_scores
        writer.write(key, sample)
        k_min = len(sel.ids) if k_min is None else min(k_min, len(sel.ids))
        k_max = max(k_max, len(sel.ids))
    return writer.close(), counts, filtered, (k_min or 0, k_max)


def mine(cfg: MineJobConfig) -> dict[str, Any]:
    """Mine hard negatives for mine.input into mine.output; returns the manifest (on rank 0; {} elsewhere)."""
    from embedscale.data.manifest import default_name, fresh_output, input_digest, new_manifest, write_manifest
    from embedscale.data.records import resolve_data_root
    from embedscale.distributed import barrier, init_from_env, world
    from embedscale.retrieval.mining import REASONS

    c = cfg.mine
    start_all = time.perf_counter()
    init_from_env()
    rank, size = world()
    root = resolve_data_root(cfg.data_root)
    name = c.name or f"{default_name(Path(c.input))}-{c.method}"
    out = Path(c.output or Path("shards") / name)
    if rank == 0:  # before any encoding: an existing output is an error now, not after the work
        out = fresh_output(out, overwrite=c.overwrite, job="mine")
    data = load_mining_data(c, root)
    queries = list(dict.fromkeys(s.query for s in data.samples))  # unique, first-seen order
    qrow = {q: i for i, q in enumerate(queries)}
    timings: dict[str, float] = {}
    cand = find_candidates(cfg, data, queries, timings)
    if rank != 0:
        barrier()
        return {}
    plans, same_of = _eligibility(cfg, data, cand, qrow)
    ce = None
    if c.cross_encoder:
        start = time.perf_counter()
        ce = cross_encoder_scores(cfg, _window_pairs(c, data, cand, qrow, plans))
        timings["cross_encoder_s"] = round(time.perf_counter() - start, 2)
    shards, counts, filtered, k_range = write_mined(cfg, data, cand, qrow, plans, same_of, ce, out, name)
    size_bytes, digest = input_digest(resolve_path(c.input, root))
    extra = {"positive_score": "float", "negative_scores": "list[float]", "negative_ranks": "list[int]"}
    extra["negative_ids"] = "list[str]"
    if ce is not None:
        extra.update(positive_ce_score="float", negative_ce_scores="list[float]")
    manifest = new_manifest(
        name, shards, samples=len(data.samples), negatives=k_range, created_by="mine", extra_fields=extra
    )
    uses_bm25 = c.method in (MineMethod.bm25, MineMethod.hybrid)
    manifest["sources"] = [{"path": c.input, "bytes": size_bytes, "sha256": digest, "samples": len(data.samples)}]
    manifest["mining"] = {
        "method": str(c.method),
        "model": cand.model or None,
        "index": asdict(cfg.index) if c.method != MineMethod.bm25 else None,
        "bm25": {"library": "bm25s", "stemmer": "english", "stopwords": "en"} if uses_bm25 else None,
        "cross_encoder": c.cross_encoder,
        "params": {k: v for k, v in asdict(c).items() if k not in ("output", "overwrite", "cache_dir")},
        "corpus_documents": len(data.doc_ids),
        "queries": len(queries),
        "world_size": size,
        "counts": {
            "samples": len(data.samples),
            "negatives_kept": counts["negatives"],
            "taken_beyond_window": counts["beyond_window"],
            "random_fill": counts["random_fill"],
            "samples_with_fewer": counts["samples_with_fewer"],
            "filtered_in_window": {r: filtered[r] for r in REASONS},
        },
        "seconds": {**timings, "total_s": round(time.perf_counter() - start_all, 2)},
    }
    write_manifest(out, manifest)
    barrier()
    manifest["output"] = str(out)
    return manifest
