"""Job `embedscale mine`: load pairs + corpus -> candidates (dense/BM25/hybrid) -> filters -> shards.

    embedscale mine                                   # SciFact train, all-MiniLM-L6-v2, dense, 7 negatives
    embedscale mine mine.method=bm25 mine.output=shards/scifact-bm25
    embedscale mine model.name_or_path=runs/train/X/model mine.relative_margin=0.05 mine.window_start=3
    torchrun --nproc_per_node=4 -m embedscale.mine ...  # corpus and queries encoded over 4 ranks

The output is a sharded dataset in the training format (`data.format=shards`); every sample also
carries the scores and ranks of its positive and negatives, and the manifest records the mining model
(its path, checkpoint and weight fingerprint), the index, the parameters and the counts (kept,
filtered by which rule, taken past the window). See docs/mining.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from embedscale.cli import hydra_job
from embedscale.config import MineJobConfig

log = logging.getLogger(__name__)


class MiningData:
    """Samples, the corpus (ids and texts) and, per sample, the corpus positions that are its positives."""

    def __init__(self) -> None:
        self.samples: list = []  # PairExample
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


def _read_shards(path: Path):
    from embedscale.data.batch import PairExample
    from embedscale.data.shards import ShardedDataset

    ds = ShardedDataset.open(path)
    for shard, meta in enumerate(ds.shards):
        for row in ds.read(shard, range(meta["samples"])):
            yield PairExample(row["query"], row["positive"], list(row.get("negatives") or []), row.get("key", ""))


def _read_extra_corpus(path: Path, data: MiningData) -> None:
    from embedscale.data.readers import iter_jsonl, read_corpus

    if path.is_dir():
        for doc_id, text in read_corpus(path).items():
            data.add_doc(doc_id, text)
        return
    for line_no, row in iter_jsonl(path):
        text = " ".join(t for t in (row.get("title", ""), row.get("text", "")) if t).strip()
        if not text:
            raise ValueError(f"{path}:{line_no}: no `text` field (mine.corpus rows need text, optional _id and title)")
        data.add_doc(str(row.get("_id", f"{path.stem}:{line_no}")), text)


def load_data(c, root: Path) -> MiningData:
    """The samples to mine for and the corpus to mine from (see MineConfig.input/corpus)."""
    from embedscale.data import convert
    from embedscale.data.readers import read_corpus, read_qrels, resolve_path

    path = resolve_path(c.input, root)
    if not path.exists():
        raise ValueError(f"mine.input: {path} does not exist (data root {root}); fix the path or data_root")
    data = MiningData()
    if c.format == "beir":
        position = {doc_id: data.add_doc(doc_id, text) for doc_id, text in read_corpus(path).items()}
        qrels_dir = path / "qrels"
        labelled: dict[str, set[str]] = {}
        for split_file in sorted(qrels_dir.glob("*.tsv")):  # a positive in any split is never a negative
            for qid, docs in read_qrels(path, split_file.stem).items():
                labelled.setdefault(qid, set()).update(d for d, rel in docs.items() if rel > 0)
        for rec in convert.beir_records(path, c.split):
            qid, did = rec.key.split(":", 1)
            data.samples.append(rec)
            data.positive_of.append(position[did])
            known = data.positives_of_query.setdefault(rec.query, set())
            known.update(position[d] for d in labelled.get(qid, ()) if d in position)
    else:
        if c.format == "shards":
            records = _read_shards(path)
        else:
            records = convert.records(
                c.format,
                path,
                split=c.split,
                query_field=c.query_field,
                positive_field=c.positive_field,
                negatives_field=c.negatives_field,
            )
        for rec in records:
            same = data.positions_of_text(rec.positive)
            pos = same[0] if same else data.add_doc(f"positive:{len(data.doc_ids)}", rec.positive)
            data.samples.append(rec)
            data.positive_of.append(pos)
            data.positives_of_query.setdefault(rec.query, set()).add(pos)
    if c.corpus:
        _read_extra_corpus(resolve_path(c.corpus, root), data)
    if not data.samples:
        raise ValueError(f"mine.input: {path} holds no (query, positive) samples (split {c.split!r})")
    return data


def _load_biencoder(cfg: MineJobConfig):
    import torch

    from embedscale.encoder.biencoder import load_encoder

    encoder, tokenizer = load_encoder(cfg.model)
    if cfg.mine.checkpoint:
        ckpt = torch.load(cfg.mine.checkpoint, map_location="cpu", weights_only=True)
        state = {k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.startswith("document_backbone.")]:
            raise ValueError(
                f"mine.checkpoint={cfg.mine.checkpoint} does not match model.name_or_path={cfg.model.name_or_path} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): give the model the checkpoint was trained from"
            )
    if torch.cuda.is_available():
        encoder.to(torch.device("cuda", torch.cuda.current_device()))
    return encoder, tokenizer


def dense_candidates(cfg: MineJobConfig, data: MiningData, queries: list[str], timings: dict):
    """(ids (Q, K), scores (Q, K), query embeddings (Q, D), doc embeddings (N, D), model fingerprint) on every rank."""
    from embedscale.retrieval.encode import default_cache_dir, encode_corpus, encode_sharded
    from embedscale.retrieval.index import build_index, rank_world, search

    c = cfg.mine
    encoder, tokenizer = _load_biencoder(cfg)
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
    if rank_world()[0] != 0:
        return None, None, q_QD, docs_ND, fingerprint
    start = time.perf_counter()
    index = build_index(docs_ND, cfg.index, seed=c.seed)
    timings["index_build_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    scores, ids = search(index, q_QD, c.candidates)
    timings["search_s"] = round(time.perf_counter() - start, 3)
    return ids, scores, q_QD, docs_ND, fingerprint


def _ce_scores(cfg: MineJobConfig, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    from embedscale.encoder.crossencoder import load_cross_encoder, score_pairs

    c = cfg.mine
    model, tokenizer = load_cross_encoder(c.cross_encoder, max_length=c.ce_max_length)
    if model.new_parameters:
        raise ValueError(
            f"mine.cross_encoder={c.cross_encoder} has no trained relevance head "
            f"({', '.join(model.new_parameters[:2])} were initialised fresh): "
            "train one with `embedscale reranker` and pass its model/ directory"
        )
    unique = sorted(set(pairs))
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


def run(cfg: MineJobConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    from embedscale.data.readers import resolve_data_root, resolve_path
    from embedscale.data.shards import ShardWriter, fresh_output, new_manifest, write_manifest
    from embedscale.retrieval.index import barrier, init_distributed_from_env, rank_world
    from embedscale.retrieval.mining import (
        BM25,
        REASONS,
        SelectSpec,
        eligible,
        fill_random,
        rrf_fuse,
        sample_rng,
        select,
    )
    from embedscale.shard import default_name, input_digest

    c = cfg.mine
    start_all = time.perf_counter()
    init_distributed_from_env()
    rank, world = rank_world()
    root = resolve_data_root(cfg.data_root)
    name = c.name or f"{default_name(Path(c.input))}-{c.method}"
    out = Path(c.output or Path("shards") / name)
    if rank == 0:  # before any encoding: an existing output is an error now, not after the work
        out = fresh_output(out, overwrite=c.overwrite, job="mine")
    data = load_data(c, root)
    queries = list(dict.fromkeys(s.query for s in data.samples))  # unique, first-seen order
    qrow = {q: i for i, q in enumerate(queries)}
    timings: dict[str, float] = {}
    depth = c.candidates
    model_info: dict[str, Any] = {}
    dense = bm25 = None
    if c.method in ("dense", "hybrid"):
        ids, scores, q_QD, docs_ND, fingerprint = dense_candidates(cfg, data, queries, timings)
        dense = (ids, scores)
        model_info = {"name_or_path": cfg.model.name_or_path, "checkpoint": c.checkpoint, "fingerprint": fingerprint}
    if rank != 0:
        barrier()
        return {}
    if c.method in ("bm25", "hybrid"):
        start = time.perf_counter()
        index = BM25(data.doc_texts)
        positives = [sorted(data.positives_of_query[q]) for q in queries]
        ids, scores, pos_scores = index.search(queries, depth, score_docs=positives)
        bm25 = (ids, scores, {(q, d): s for q, ds, ss in zip(queries, positives, pos_scores) for d, s in zip(ds, ss)})
        timings["bm25_s"] = round(time.perf_counter() - start, 3)
    if c.method == "hybrid":
        cand_ids, _ = rrf_fuse([(dense[0], dense[1]), (bm25[0], bm25[1])], depth)
        safe = np.maximum(cand_ids, 0)
        cand_scores = torch.einsum("qd,qkd->qk", q_QD, docs_ND[torch.from_numpy(safe)]).numpy()  # dense scores
        cand_scores[cand_ids < 0] = -np.inf
    elif c.method == "dense":
        cand_ids, cand_scores = dense[0], dense[1]
    else:
        cand_ids, cand_scores = bm25[0], bm25[1]

    def positive_score(query: str, doc: int) -> float:
        if c.method == "bm25":
            return bm25[2][(query, doc)]
        return float(q_QD[qrow[query]] @ docs_ND[doc])

    spec = SelectSpec(**{f.name: getattr(c, f.name) for f in fields(SelectSpec)})  # MineConfig's same keys
    plans, same_of = [], []
    for i, rec in enumerate(data.samples):
        row = qrow[rec.query]
        same = {
            p
            for t in (rec.query, *(data.doc_texts[d] for d in data.positives_of_query[rec.query]))
            for p in data.positions_of_text(t)
        }
        pos_score = positive_score(rec.query, data.positive_of[i])
        ranks, why = eligible(
            cand_ids[row],
            cand_scores[row],
            positives=data.positives_of_query[rec.query],
            same_text=same,
            positive_score=pos_score,
            spec=spec,
        )
        plans.append((ranks, why, pos_score))
        same_of.append(same)
    ce = None
    if c.cross_encoder:
        pairs = []
        for i, (ranks, _, _) in enumerate(plans):
            rec = data.samples[i]
            row = qrow[rec.query]
            window = [r for r in ranks if r < c.window_end] + [r for r in ranks if r >= c.window_end][: c.num_negatives]
            pairs += [(rec.query, data.doc_texts[cand_ids[row][r]]) for r in window]
            pairs.append((rec.query, rec.positive))
        start = time.perf_counter()
        ce = _ce_scores(cfg, pairs)
        timings["cross_encoder_s"] = round(time.perf_counter() - start, 2)

    writer = ShardWriter(out, f"{name}-000", max_bytes=int(c.target_mb * 2**20))
    filtered, counts = Counter(), Counter()
    k_min, k_max = None, 0
    for i, (rec, (ranks, why, pos_score)) in enumerate(zip(data.samples, plans)):
        row = qrow[rec.query]
        ce_logits = ce_positive = None
        if ce is not None:
            ce_logits = {
                r: ce[(rec.query, data.doc_texts[cand_ids[row][r]])]
                for r in ranks
                if (rec.query, data.doc_texts[cand_ids[row][r]]) in ce
            }
            ce_positive = ce[(rec.query, rec.positive)]
        key = f"{name}-000-{i:09d}"
        rng = sample_rng(c.seed, rec.key or key)
        sel = select(
            cand_ids[row], cand_scores[row], ranks, spec=spec, rng=rng, ce_logits=ce_logits, ce_positive=ce_positive
        )
        if len(sel.ids) < c.num_negatives and c.random_fill:
            score = None if c.method == "bm25" else (lambda d, r=row: float(q_QD[r] @ docs_ND[d]))
            excluded = data.positives_of_query[rec.query] | same_of[i]
            counts["random_fill"] += fill_random(
                sel,
                c.num_negatives,
                corpus_size=len(data.doc_ids),
                excluded=excluded,
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
                    f"mine.num_negatives={c.num_negatives} in {depth} candidates after the filters: "
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
    shards = writer.close()
    size, digest = input_digest(resolve_path(c.input, root))
    extra = {"positive_score": "float", "negative_scores": "list[float]", "negative_ranks": "list[int]"}
    extra["negative_ids"] = "list[str]"
    if ce is not None:
        extra.update(positive_ce_score="float", negative_ce_scores="list[float]")
    manifest = new_manifest(
        name, shards, samples=len(data.samples), negatives=(k_min or 0, k_max), created_by="mine", extra_fields=extra
    )
    manifest.update(
        {
            "sources": [{"path": c.input, "bytes": size, "sha256": digest, "samples": len(data.samples)}],
            "mining": {
                "method": c.method,
                "model": model_info or None,
                "index": asdict(cfg.index) if dense is not None else None,
                "bm25": {"library": "bm25s", "stemmer": "english", "stopwords": "en"} if bm25 is not None else None,
                "cross_encoder": c.cross_encoder,
                "params": {k: v for k, v in asdict(c).items() if k not in ("output", "overwrite", "cache_dir")},
                "corpus_documents": len(data.doc_ids),
                "queries": len(queries),
                "world_size": world,
                "counts": {
                    "samples": len(data.samples),
                    "negatives_kept": counts["negatives"],
                    "taken_beyond_window": counts["beyond_window"],
                    "random_fill": counts["random_fill"],
                    "samples_with_fewer": counts["samples_with_fewer"],
                    "filtered_in_window": {r: filtered[r] for r in REASONS},
                },
                "seconds": timings,
            },
        }
    )
    manifest["mining"]["seconds"]["total_s"] = round(time.perf_counter() - start_all, 2)
    write_manifest(out, manifest)
    barrier()
    m = manifest["mining"]["counts"]
    print(
        f"{name}: {m['samples']} samples, {m['negatives_kept']} negatives ({c.method}; "
        f"{m['taken_beyond_window']} past the window; filtered in window: "
        + ", ".join(f"{r} {n}" for r, n in m["filtered_in_window"].items() if n)
        + f") -> {out} in {manifest['mining']['seconds']['total_s']:.1f} s"
    )
    return manifest


main = hydra_job("mine", MineJobConfig, run)

if __name__ == "__main__":
    main()
