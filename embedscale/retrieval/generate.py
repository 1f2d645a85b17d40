"""Synthetic queries for a corpus: an LM writes queries for each document, a round-trip filter keeps the ones that
retrieve their document, and the pairs are written as training shards with provenance.

`generate(cfg)` is what `embedscale generate` runs (embedscale/jobs/generate.py); the language-model side (loading,
prompts, seeded sampling, batches over ranks) is retrieval/lm.py. The steps, in order:

1. **Generate** `queries_per_document` rows per document (each row its own sequence, seeded by (seed, document id,
   query index): lm.py explains why that makes the output independent of batches and ranks). Under torchrun each
   rank generates whole batches round-robin and the texts are gathered to every rank.
2. **Clean**: strip, keep the first non-empty line; an empty result is counted and dropped.
3. **Deduplicate** on the text normalised for case and whitespace: a repeat within one document's queries is
   dropped (the first is kept); a query generated for two or more documents is dropped for all of them -- it is
   not specific to any one of them, and as a training pair it would make the other document a false negative.
4. **Round-trip filter** (`filter_top_k` > 0): the filter bi-encoder (model.*) encodes the whole corpus (sharded,
   cached on disk: retrieval/encode.py) and the queries; a pair is kept when fewer than k corpus documents score
   strictly higher than its own document (its rank < k; a tie with the document's own score does not push it out).
5. **Write** the kept pairs (rank 0) in corpus order as shards (`data.format=shards`), each sample with its
   `doc_id`, `query_index`, `generator` and, with the filter, `filter_rank` and `filter_score`; the manifest's
   `generation` block records the LM, prompt, sampling, seed, counts, filter and timings.

Legend: R = generated rows (documents x queries per document), Q = queries left after cleaning and dedup,
N = corpus documents, D = embedding dim.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedscale.config import GenerateJobConfig

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """The documents of generate.corpus in file order: ids, titles, bodies, and the joined "title text" that is
    both the filter's corpus and the written positive."""

    ids: list[str]
    titles: list[str]
    bodies: list[str]

    @functools.cached_property
    def texts(self) -> list[str]:
        return [f"{t} {b}".strip() for t, b in zip(self.titles, self.bodies, strict=True)]


def read_documents(cfg: GenerateJobConfig, root: Path) -> tuple[Corpus, Path]:
    """generate.corpus (a BEIR directory or a JSONL file) as a Corpus, and its resolved path."""
    from embedscale.data.records import read_corpus_documents, resolve_path

    c = cfg.generate
    path = resolve_path(c.corpus, root)
    if not path.exists():
        raise ValueError(f"generate.corpus: {path} does not exist (data root {root}); fix the path or data_root")
    docs = read_corpus_documents(path, text_field=c.text_field, title_field=c.title_field, section="generate")
    if not docs:
        raise ValueError(f"generate.corpus: {path} holds no documents")
    ids, titles, bodies = (list(x) for x in zip(*docs, strict=True))
    return Corpus(ids, titles, bodies), path


def clean_query(text: str) -> str:
    """The first non-empty line of a generation, stripped ("" when there is none)."""
    text = text.strip()
    return text.split("\n", 1)[0].strip()


def normalise(text: str) -> str:
    """The dedup key: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def deduplicate(queries_R: list[str], doc_R: list[int]) -> tuple[list[int], Counter]:
    """Rows to keep of the cleaned queries, in row order, and counts by reason (empty, duplicate_in_document,
    duplicate_across_documents). See the module docstring for the rules."""
    counts: Counter = Counter()
    first: dict[tuple[int, str], int] = {}  # (document, normalised query) -> its first row
    docs_of: dict[str, set[int]] = {}
    for r, (query, doc) in enumerate(zip(queries_R, doc_R, strict=True)):
        if not query:
            counts["empty"] += 1
            continue
        key = normalise(query)
        if (doc, key) in first:
            counts["duplicate_in_document"] += 1
            continue
        first[(doc, key)] = r
        docs_of.setdefault(key, set()).add(doc)
    keep = []
    for (_, key), r in sorted(first.items(), key=lambda item: item[1]):
        if len(docs_of[key]) > 1:
            counts["duplicate_across_documents"] += 1
        else:
            keep.append(r)
    return keep, counts


def document_ranks(q_QD: torch.Tensor, docs_ND: torch.Tensor, doc_Q: torch.Tensor, *, chunk: int = 1024):
    """Each query's rank of its own document over the corpus (documents scoring strictly higher: 0 is the top) and
    that document's score: (ranks (Q,) int64, scores (Q,) float32). Scored in chunks of queries."""
    ranks, scores = [], []
    for start in range(0, q_QD.shape[0], chunk):
        s_qN = q_QD[start : start + chunk] @ docs_ND.T
        own_q1 = s_qN.gather(1, doc_Q[start : start + chunk, None])
        ranks.append((s_qN > own_q1).sum(1))
        scores.append(own_q1[:, 0])
    if not ranks:
        return torch.empty(0, dtype=torch.int64), torch.empty(0)
    return torch.cat(ranks), torch.cat(scores)


def round_trip(cfg: GenerateJobConfig, corpus: Corpus, queries_Q: list[str], doc_Q: list[int], timings: dict):
    """The filter model's (ranks (Q,), scores (Q,), provenance) of each query's document over the whole corpus.
    Every rank encodes its share (collectives); the ranks are computed on every rank (cheap next to encoding)."""
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.encode import encode_corpus, encode_sharded
    from embedscale.runtime import default_cache_dir

    c = cfg.generate
    start = time.perf_counter()
    encoder, tokenizer = load_encoder(cfg.model)
    if torch.cuda.is_available():
        encoder.to(torch.device("cuda", torch.cuda.current_device()))
    cache = Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir()
    docs_ND = encode_corpus(
        encoder, tokenizer, corpus.ids, corpus.texts, batch_size=c.filter_batch_size, cache_dir=cache
    )
    q_QD = encode_sharded(encoder, tokenizer, queries_Q, side="query", batch_size=c.filter_batch_size)
    timings["filter_encode_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    ranks_Q, scores_Q = document_ranks(q_QD, docs_ND, torch.tensor(doc_Q, dtype=torch.int64))
    timings["filter_search_s"] = round(time.perf_counter() - start, 3)
    model = {"name_or_path": cfg.model.name_or_path, "fingerprint": encoder.fingerprint("document")}
    return ranks_Q.tolist(), scores_Q.tolist(), model


def write_generated(out: Path, name: str, samples: list[dict], *, target_mb: float) -> list[dict]:
    """The kept samples as shards `<name>-000-NNNNNN.tar` (keys `<name>-000-<position>`); returns the shards."""
    from embedscale.data.shards import ShardWriter

    writer = ShardWriter(out, f"{name}-000", max_bytes=int(target_mb * 2**20))
    for i, sample in enumerate(samples):
        key = f"{name}-000-{i:09d}"
        writer.write(key, {"key": key, **sample})
    return writer.close()


def _fresh_output_on_rank0(out: Path, overwrite: bool) -> Path:
    """fresh_output on rank 0, its refusal raised on every rank (the others would otherwise wait in a collective)."""
    from embedscale.data.manifest import fresh_output
    from embedscale.distributed import broadcast_object, world

    error = None
    if world()[0] == 0:
        try:
            out = fresh_output(out, overwrite=overwrite, job="generate")
        except ValueError as err:
            error = str(err)
    error = broadcast_object(error)
    if error:
        raise ValueError(error)
    return out


@dataclass
class Rows:
    """Every generated row (document d, query index j), d-major, and what became of it."""

    doc_R: list[int]  # corpus position of the row's document
    index_R: list[int]  # j
    queries_R: list[str]  # cleaned generations
    keep: list[int]  # rows left after cleaning and dedup (the filter's Q candidates), in row order
    ranks_Q: list[int] | None = None  # the filter's rank of each candidate's document (0: the top)
    scores_Q: list[float] | None = None


def kept_samples(cfg: GenerateJobConfig, corpus: Corpus, rows: Rows, name: str, counts: Counter) -> list[dict]:
    """The samples written, in row order: the deduplicated queries whose document the filter ranks within
    filter_top_k (every one without the filter); the others are counted as filtered_out."""
    c = cfg.generate
    samples = []
    for q, r in enumerate(rows.keep):
        d, j = rows.doc_R[r], rows.index_R[r]
        if c.filter_top_k > 0 and rows.ranks_Q[q] >= c.filter_top_k:
            counts["filtered_out"] += 1
            continue
        sample = {
            "query": rows.queries_R[r],
            "positive": corpus.texts[d],
            "negatives": [],
            "source": name,
            "origin": f"{corpus.ids[d]}:{j}",
            "doc_id": corpus.ids[d],
            "query_index": j,
            "generator": c.lm,
        }
        if c.filter_top_k > 0:
            sample.update(filter_rank=rows.ranks_Q[q], filter_score=rows.scores_Q[q])
        samples.append(sample)
    return samples


def generation_section(cfg: GenerateJobConfig, **parts) -> dict[str, Any]:
    """The manifest's `generation` block: the LM, the prompt, the sampling, the filter, counts and timings."""
    c = cfg.generate
    return {
        "lm": parts["lm"],
        "task": c.task,
        "prompt_template": c.template,
        "sampling": {
            "do_sample": c.do_sample,
            "temperature": c.temperature if c.do_sample else None,
            "top_p": c.top_p if c.do_sample else None,
            "max_new_tokens": c.max_new_tokens,
            "max_document_tokens": c.max_document_tokens,
            "queries_per_document": c.queries_per_document,
            "batch_size": c.batch_size,
            "seed": c.seed,
            "seeded_by": "(generate.seed, document id, query index), one stream per query (retrieval/lm.py)",
        },
        "corpus": parts["corpus"],
        "counts": parts["counts"],
        "filter": {"model": parts["filter_model"], "top_k": c.filter_top_k} if c.filter_top_k > 0 else None,
        "world_size": parts["world_size"],
        "seconds": parts["seconds"],
    }


def count_summary(rows: Rows, counts: Counter, *, documents: int, without_text: int, samples: list[dict]) -> dict:
    """The counts of the manifest; generated = empty + both kinds of duplicates + filtered_out + kept."""
    candidates = len(rows.keep)
    return {
        "documents": documents,
        "documents_without_text": without_text,
        "generated": len(rows.doc_R),
        "empty": counts["empty"],
        "duplicates_in_document": counts["duplicate_in_document"],
        "duplicates_across_documents": counts["duplicate_across_documents"],
        "filter_candidates": candidates,
        "filtered_out": counts["filtered_out"],
        "kept": len(samples),
        "filter_rate": round(counts["filtered_out"] / candidates, 6) if candidates else 0.0,
        "documents_with_a_kept_query": len({s["doc_id"] for s in samples}),
    }


def generate(cfg: GenerateJobConfig) -> dict[str, Any]:
    """Generate, clean, deduplicate and filter queries for generate.corpus and write them to generate.output;
    returns the manifest with `output` (on rank 0; {} on the other ranks)."""
    from embedscale.data.manifest import default_name, input_digest, new_manifest, write_manifest
    from embedscale.data.records import resolve_data_root
    from embedscale.distributed import barrier, init_from_env, world
    from embedscale.retrieval.lm import generate_queries

    c = cfg.generate
    c.validate()
    start_all = time.perf_counter()
    init_from_env()
    rank, size = world()
    name = c.name or f"{default_name(Path(c.corpus))}-generated"
    out = _fresh_output_on_rank0(Path(c.output or Path("shards") / name), c.overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    corpus, corpus_path = read_documents(cfg, resolve_data_root(cfg.data_root))
    chosen = range(len(corpus.ids))[: c.max_documents]
    docs = [d for d in chosen if corpus.texts[d]]
    timings["read_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    ids, titles, bodies = ([xs[d] for d in docs] for xs in (corpus.ids, corpus.titles, corpus.bodies))
    raw_R, lm_info = generate_queries(c, ids, titles, bodies)
    timings["generate_s"] = round(time.perf_counter() - start, 2)
    n = c.queries_per_document
    doc_R = [d for d in docs for _ in range(n)]
    queries_R = [clean_query(t) for t in raw_R]
    keep, counts = deduplicate(queries_R, doc_R)
    rows = Rows(doc_R, [j for _ in docs for j in range(n)], queries_R, keep)
    filter_model = {"name_or_path": cfg.model.name_or_path, "fingerprint": None}  # not loaded: nothing to filter
    if c.filter_top_k > 0 and keep:
        queries_Q, doc_Q = [queries_R[r] for r in keep], [doc_R[r] for r in keep]
        rows.ranks_Q, rows.scores_Q, filter_model = round_trip(cfg, corpus, queries_Q, doc_Q, timings)
    if rank != 0:
        barrier()
        return {}

    start = time.perf_counter()
    samples = kept_samples(cfg, corpus, rows, name, counts)
    shards = write_generated(out, name, samples, target_mb=c.target_mb)
    timings["write_s"] = round(time.perf_counter() - start, 2)
    if not samples:
        log.warning("generate: no pair was kept (%s): the dataset in %s is empty", dict(counts), out)
    extra = {"doc_id": "str", "query_index": "int", "generator": "str"}
    if c.filter_top_k > 0:
        extra.update(filter_rank="int", filter_score="float")
    manifest = new_manifest(
        name, shards, samples=len(samples), negatives=(0, 0), created_by="generate", extra_fields=extra
    )
    size_bytes, digest = input_digest(corpus_path)
    manifest["sources"] = [{"path": c.corpus, "bytes": size_bytes, "sha256": digest, "samples": len(samples)}]
    manifest["generation"] = generation_section(
        cfg,
        lm=lm_info,
        corpus={"path": str(corpus_path), "documents": len(corpus.ids), "max_documents": c.max_documents},
        counts=count_summary(rows, counts, documents=len(docs), without_text=len(chosen) - len(docs), samples=samples),
        filter_model=filter_model,
        world_size=size,
        seconds={**timings, "total_s": round(time.perf_counter() - start_all, 2)},
    )
    write_manifest(out, manifest)
    barrier()
    manifest["output"] = str(out)
    return manifest
