"""Corpus encoding shared by mining and evaluation: sharded over ranks, cached on disk.

Under torchrun (or any initialised process group) rank r encodes batches r, r + W, ... of the
length-sorted corpus -- about equal work per rank, little padding -- and the rows are gathered, so
every rank ends with the (N, D) matrix one process computes: the same batches, so the same bits
(tests/test_mining.py checks 2 ranks against 1).

The cache key is the document tower's weights and encoding settings (`BiEncoder.fingerprint`), the
token budget, and every (id, text) of the corpus: a changed model, prefix, length or corpus never
reads a stale file, and the same model over the same corpus is encoded once per machine.

Legend: N = corpus texts, D = dim.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from embedscale.distributed import broadcast_object, gather_rows, world
from embedscale.encoder.biencoder import BiEncoder, encode_texts, length_batches

log = logging.getLogger(__name__)


def corpus_key(encoder: BiEncoder, ids: list[str], texts: list[str], *, max_length: int | None, side: str) -> str:
    """Cache key of (model tower, settings, corpus)."""
    key = hashlib.sha256()
    key.update(encoder.fingerprint(side).encode())
    limit = max_length or (encoder.cfg.document_max_length if side == "document" else encoder.cfg.query_max_length)
    key.update(repr((limit, side)).encode())
    for doc_id, text in zip(ids, texts):
        key.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return key.hexdigest()[:24]


def encode_sharded(
    encoder: BiEncoder,
    tokenizer,
    texts: list[str],
    *,
    side: str,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = False,
    prefix: str | None = None,
) -> torch.Tensor:
    """`encode_texts` with the texts split over the ranks of the process group: (N, D) on every rank."""
    rank, size = world()
    kwargs = dict(side=side, batch_size=batch_size, max_length=max_length, prefix=prefix)
    if size == 1:
        return encode_texts(encoder, tokenizer, texts, progress=progress, **kwargs)
    # Whole batches of the length-sorted order go round-robin to the ranks, so every batch has the
    # same texts and padding as in one process: the rows are the single-process rows, bit for bit.
    batches = length_batches(texts, batch_size)
    mine_n = torch.tensor([i for batch in batches[rank::size] for i in batch], dtype=torch.int64)
    local_nD = encode_texts(
        encoder,
        tokenizer,
        [texts[i] for i in mine_n.tolist()],
        progress=progress and rank == 0,
        **kwargs,
    )
    return gather_rows(local_nD, mine_n, len(texts))


def encode_corpus(
    encoder: BiEncoder,
    tokenizer,
    ids: list[str],
    texts: list[str],
    *,
    side: str = "document",
    batch_size: int = 64,
    max_length: int | None = None,
    cache_dir: Path | None = None,
    name: str = "corpus",
) -> torch.Tensor:
    """(N, D) embeddings of a corpus, from the cache when this model has encoded it before.

    Every rank returns the full matrix; only rank 0 writes the cache (atomically)."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{name}-{corpus_key(encoder, ids, texts, max_length=max_length, side=side)}.pt"
    rank, _ = world()
    if path is not None and broadcast_object(path.exists() if rank == 0 else None):
        if not path.exists():
            raise ValueError(f"{path} exists on rank 0 but not on rank {rank}: put the cache on a shared filesystem")
        cached_ND = read_cache(path, rows=len(ids))
        if broadcast_object(cached_ND is not None if rank == 0 else None):  # every rank takes the same branch
            log.info("%s: embeddings from cache %s", name, path)
            return cached_ND if cached_ND is not None else read_cache(path, rows=len(ids))
    out_ND = encode_sharded(
        encoder, tokenizer, texts, side=side, batch_size=batch_size, max_length=max_length, progress=True
    )
    if path is not None and rank == 0:
        write_cache(path, out_ND)
    return out_ND


def _digest(x_ND: torch.Tensor) -> str:
    return hashlib.sha256(x_ND.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def write_cache(path: Path, x_ND: torch.Tensor) -> None:
    """The embeddings with their shape, dtype and content hash, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    record = {"format": 2, "shape": list(x_ND.shape), "dtype": str(x_ND.dtype), "sha256": _digest(x_ND), "x": x_ND}
    torch.save(record, tmp)
    tmp.replace(path)


def read_cache(path: Path, *, rows: int) -> torch.Tensor | None:
    """The cached embeddings when the file is whole and what it says it is: (rows, D) float32 matching its content
    hash; else None, with a warning naming the problem (the caller re-encodes and rewrites the cache)."""
    try:
        record = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or corrupt file: any unpickling error
        log.warning("embedding cache %s is unreadable (%s): encoding again", path, err)
        return None
    x = record.get("x") if isinstance(record, dict) else None
    problem = None
    if not isinstance(x, torch.Tensor):
        problem = "not an embedding record of this version"
    elif x.dtype != torch.float32 or x.dim() != 2 or x.shape[0] != rows or list(x.shape) != record.get("shape"):
        problem = f"shape {tuple(x.shape)} {x.dtype}, expected ({rows}, D) float32"
    elif _digest(x) != record.get("sha256"):
        problem = "its content does not match its hash (modified after it was written)"
    if problem:
        log.warning("embedding cache %s: %s: encoding again", path, problem)
        return None
    return x
