"""Index scale: build and search time, memory, and recall@10 of approximate indexes vs exact (flat).

    python bench/index_scale.py                        # 1M x 384 clustered vectors, 10K queries, flat vs IVF
    python bench/index_scale.py --n 100000 --kinds flat,ivf,hnsw,ivfpq --nprobe 8,32

The vectors are synthetic but shaped like text embeddings: L2-normalised points around 2,000 random
centres with noise as large as the centre (so clusters overlap and a point's true neighbours often
sit in other IVF cells, which is what makes IVF approximate), queries drawn from the same mixture.
Recall@10 of an index = |its top 10 ∩ flat's top 10| / 10, averaged over queries (flat is exact,
so its recall is 1 by definition). Every index is built and searched by the same functions
`embedscale mine` uses (embedscale/retrieval/index.py).
Memory: the serialized index size (what it holds) and the process's RSS growth while building.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def clustered(n: int, dim: int, centres: int, rng: np.random.Generator, *, spread: float = 1.0) -> np.ndarray:
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):  # in blocks: no (n, dim) float64 temporaries
        m = min(step, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        x[start : start + m] = c[rng.integers(centres, size=m)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    import faiss

    from embedscale.config import IndexConfig
    from embedscale.retrieval.index import build_index, index_bytes, search

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--centres", type=int, default=2_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="flat,ivf")
    p.add_argument("--nlist", type=int, default=0, help="0: 4 x sqrt(N)")
    p.add_argument("--nprobe", default="8,32,128", help="IVF nprobe values searched (one build)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="index_scale")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    x_ND = clustered(args.n, args.dim, args.centres, rng)
    q_QD = clustered(args.queries, args.dim, args.centres, np.random.default_rng(args.seed))  # same centres
    q_QD = q_QD[rng.permutation(len(q_QD))]
    print(f"data: {args.n} x {args.dim} + {args.queries} queries in {time.perf_counter() - start:.1f} s")
    rows, truth = [], None
    kinds = args.kinds.split(",")
    if "flat" not in kinds:
        kinds = ["flat", *kinds]  # recall needs the exact answer
    for kind in kinds:
        rss0 = rss_mib()
        t0 = time.perf_counter()
        index = build_index(x_ND, IndexConfig(kind=kind, nlist=args.nlist, gpu="false"), seed=args.seed)
        build_s = time.perf_counter() - t0
        grow = rss_mib() - rss0
        size = index_bytes(index) / 2**20
        probes = [int(v) for v in args.nprobe.split(",")] if kind in ("ivf", "ivfpq") else [None]
        for nprobe in probes:
            if nprobe is not None:
                index.nprobe = nprobe
            if kind == "hnsw":
                index.hnsw.efSearch = 128
            t0 = time.perf_counter()
            _, ids = search(index, q_QD, args.k)
            search_s = time.perf_counter() - t0
            if kind == "flat":
                truth = ids
            recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids.tolist(), truth.tolist())]))
            rows.append(
                {
                    "index": kind,
                    "nlist": getattr(index, "nlist", "-"),
                    "nprobe": nprobe if nprobe is not None else "-",
                    "build_s": round(build_s, 2),
                    "search_s": round(search_s, 2),
                    "queries_per_s": round(args.queries / search_s, 1),
                    f"recall@{args.k}_vs_flat": round(recall, 4),
                    "index_mib": round(size, 1),
                    "rss_growth_mib": round(grow, 1),
                }
            )
            print(rows[-1], flush=True)
        del index
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(
        args.name,
        rows,
        {
            "n": args.n,
            "dim": args.dim,
            "queries": args.queries,
            "centres": args.centres,
            "threads": args.threads,
            "peak_rss_mib": round(peak, 1),
            "vectors_mib": round(x_ND.nbytes / 2**20, 1),
        },
    )
    print(f"peak RSS {peak:.0f} MiB (vectors alone {x_ND.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
