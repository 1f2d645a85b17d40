"""Vector indexes (faiss): build and search.

Mining and evaluation search the same way: embeddings in, (scores, indices) out, inner product.
`kind` picks the faiss structure:

- `flat`   exact inner product (the default; brute force, O(N) per query, no training)
- `ivf`    inverted lists over k-means cells (`nlist`, searched `nprobe` at a time): approximate,
           10-100x faster on millions of vectors; trained on a sample of the corpus
- `hnsw`   graph index (`hnsw_m` links, `ef_search` beam): fast and accurate, memory-hungry, slow to build
- `ivfpq`  IVF with product-quantised codes (`pq_m` sub-vectors x 8 bits): for corpora that do not fit
           in memory as float32

With faiss-gpu and a CUDA device, `gpu=auto` moves flat and IVF indexes to the GPU (HNSW has no
GPU version). Embeddings are normalised by the model when it normalises, so inner product is cosine.

Legend: N = indexed vectors, Q = queries, D = dim, K = top k.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from embedscale.config import IndexConfig

log = logging.getLogger(__name__)


def _faiss():
    import faiss

    return faiss


def default_nlist(n: int) -> int:
    return int(max(1, min(4 * round(math.sqrt(n)), n // 39)))


def _pq_m(dim: int, pq_m: int) -> int:
    if pq_m:
        if dim % pq_m:
            raise ValueError(f"index.pq_m={pq_m} must divide the embedding dim {dim}")
        return pq_m
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors_ND: np.ndarray | torch.Tensor, spec: IndexConfig, *, seed: int = 0):
    """An inner-product faiss index over the rows of `vectors_ND` (ids = row numbers)."""
    faiss = _faiss()
    x_ND = np.ascontiguousarray(
        vectors_ND.numpy() if isinstance(vectors_ND, torch.Tensor) else vectors_ND, dtype=np.float32
    )
    n, dim = x_ND.shape
    if n == 0:
        raise ValueError("cannot index an empty corpus")
    start = time.perf_counter()
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.ef_search
    else:
        nlist = spec.nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(f"index.nlist={nlist} exceeds the {n} vectors to index: lower index.nlist")
        quantizer = faiss.IndexFlatIP(dim)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_m(dim, spec.pq_m), 8, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(spec.nprobe, nlist)
    use_gpu = spec.gpu == "true" or (spec.gpu == "auto" and gpu_available())
    if spec.gpu == "true" and not gpu_available():
        raise ValueError("index.gpu=true but faiss has no GPU here: install faiss-gpu on a CUDA machine or use auto")
    if use_gpu and spec.kind in ("flat", "ivf", "ivfpq"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x_ND if n <= spec.train_size else x_ND[np.sort(rng.choice(n, spec.train_size, replace=False))]
        index.train(sample)
    index.add(x_ND)
    log.info("built %s index over %d x %d in %.2f s", spec.kind, n, dim, time.perf_counter() - start)
    return index


def search(index, queries_QD: np.ndarray | torch.Tensor, k: int, *, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores (Q, K) float32, row ids (Q, K) int64; -1 where fewer than K exist)."""
    q_QD = np.ascontiguousarray(
        queries_QD.numpy() if isinstance(queries_QD, torch.Tensor) else queries_QD, dtype=np.float32
    )
    k = min(k, index.ntotal)
    scores, ids = [], []
    for start in range(0, len(q_QD), batch):
        s_qK, i_qK = index.search(q_QD[start : start + batch], k)
        scores.append(s_qK)
        ids.append(i_qK)
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(ids)


def index_bytes(index) -> int:
    """Serialized size of a (CPU) faiss index: what it costs on disk and, roughly, in memory."""
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return int(faiss.serialize_index(index).nbytes)
