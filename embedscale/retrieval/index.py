"""Vector indexes (faiss) and the collectives of sharded encoding: build, search, gather rows.

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


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local_nD: torch.Tensor, positions_n: torch.Tensor, total: int) -> torch.Tensor:
    """Rows computed on every rank -> the full (total, D) matrix on every rank.

    Rank r holds rows `positions_n` (its share of a corpus) in `local_nD`; ranks may hold different
    counts. A gather of padded tensors (gloo and NCCL both need equal shapes), then a scatter by position.
    No gradient: this serves encoding for search, not training (that is contrastive/gather.py).
    """
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        out = torch.empty(total, local_nD.shape[1], dtype=local_nD.dtype)
        out[positions_n] = local_nD
        return out
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_nD.shape[0]], dtype=torch.int64, device=dev))
    widest = int(max(c.item() for c in counts))
    dim = torch.tensor([local_nD.shape[1] if local_nD.numel() else 0], dtype=torch.int64, device=dev)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    d = int(dim.item())
    pad_nD = torch.zeros(widest, d, dtype=torch.float32, device=dev)
    pad_n = torch.full((widest,), -1, dtype=torch.int64, device=dev)
    if local_nD.shape[0]:  # a rank can have no rows (fewer batches than ranks): (0, 0) from encode_texts
        pad_nD[: local_nD.shape[0]] = local_nD.float().to(dev)
    pad_n[: positions_n.shape[0]] = positions_n.to(dev)
    rows = [torch.empty_like(pad_nD) for _ in range(world)]
    pos = [torch.empty_like(pad_n) for _ in range(world)]
    dist.all_gather(rows, pad_nD)
    dist.all_gather(pos, pad_n)
    out = torch.empty(total, d, dtype=torch.float32)
    for r_nD, p_n, c in zip(rows, pos, counts):
        c = int(c.item())
        out[p_n[:c].cpu()] = r_nD[:c].cpu()
    return out


def init_distributed_from_env() -> None:
    """Join the process group torchrun/srun describe in the environment (WORLD_SIZE > 1), once:
    NCCL on GPUs (device = LOCAL_RANK), gloo on CPUs. A single process stays without one.

    Two exit-time traps are avoided here. Importing torch.distributed.fsdp/.checkpoint (Lightning and
    transformers' model classes do) while a gloo group exists takes C++ references to the group, so
    destroy_process_group cannot free it; they are imported first. And the group is destroyed at exit
    while the interpreter is alive: gloo worker threads still running during finalisation take the GIL
    and abort the process ("terminate called without an active exception"), seen on CI.
    """
    import atexit
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (results computed once, e.g. metrics)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
