"""The checks behind `embedscale doctor` (embedscale/jobs/doctor.py): on the real launcher and backend, is
large-batch training exact here?

On a tiny random BERT built in memory (no download), with dropout on, hard negatives, the symmetric
term and a learnable temperature, it compares
  1. the distributed gradient (gather with grad + local loss + the average over ranks), and
  2. the same with GradCache (chunk 2),
against the one-process gradient of the whole global batch, recomputed on rank 0 with the same
dropout masks; then measures all-gather bandwidth and step throughput, and prints a verdict table.
Backend: NCCL when CUDA is available, else gloo.

Legend: b = rows per rank, W = world size, N = W * b.
"""

from __future__ import annotations

import os
import time

import torch

from embedscale.distributed import allgather_bandwidth, barrier, init_from_env, world

ROWS_PER_RANK, NEGATIVES, SEQ, VOCAB = 4, 1, 12, 500
TOLERANCE = 1e-5


def _init() -> tuple[int, int, torch.device]:
    init_from_env()
    rank, size = world()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, size, torch.device("cuda", local)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    return rank, size, torch.device("cpu")


def _module(device: torch.device):
    from transformers import BertConfig, BertModel

    from embedscale.config import LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import BiEncoder

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    encoder = BiEncoder(BertModel(cfg, add_pooling_layer=False), None, ModelConfig(name_or_path="doctor-tiny-bert"))
    loss_cfg = LossConfig(symmetric_weight=1.0, learnable_temperature=True)
    return ContrastiveModule(encoder, loss_cfg=loss_cfg, optim_cfg=OptimConfig()).to(device).double().train()


def _rows(rank: int, device: torch.device):
    """This rank's batch, derived from a seed so that rank 0 can rebuild every rank's rows."""
    from embedscale.data.batch import PairBatch, TextIds

    g = torch.Generator().manual_seed(1000 + rank)
    b, k = ROWS_PER_RANK, NEGATIVES

    def tokens(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}

    positive_B = torch.arange(b) + 10 * rank + 1000
    positive_B[0] = 1000  # every rank's first positive duplicates rank 0's: masking across ranks
    negatives_Bk = torch.arange(b * k).view(b, k) + 100 * rank + 5000
    ids = TextIds((torch.arange(b) + 10 * rank).to(device), positive_B.to(device), negatives_Bk.to(device))
    return PairBatch(tokens(b), tokens(b * (1 + k)), ids, k, [f"r{rank}:{i}" for i in range(b)])


def _grads(module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def _distributed_grad(rank: int, device: torch.device, chunk: int) -> torch.Tensor:
    from embedscale.config import GradCacheConfig
    from embedscale.contrastive.gradcache import gradcache_step
    from embedscale.distributed import all_reduce_gradients_

    module = _module(device)
    torch.manual_seed(77 + rank)
    if chunk:
        gradcache_step(module, _rows(rank, device), plan=GradCacheConfig(chunk_size=chunk, sort_by_length=False))
    else:
        module.compute_loss(_rows(rank, device))[0].backward()
    all_reduce_gradients_(module.parameters())
    return _grads(module)


def _reference_grad(world: int, device: torch.device, chunk: int) -> torch.Tensor:
    """One process, whole global batch; rank r's rows encoded under rank r's seed (same dropout)."""
    from embedscale.contrastive.gradcache import split_tokens
    from embedscale.contrastive.losses import contrastive_loss
    from embedscale.data.batch import TextIds

    module = _module(device)
    enc = module.encoder
    q, pos, neg, ids = [], [], [], []
    for r in range(world):
        batch = _rows(r, device)
        torch.manual_seed(77 + r)
        # the same forward calls as the rank made: whole batch, or GradCache's trimmed chunks
        q_parts = [c.tokens for c in split_tokens(batch.queries, chunk)] if chunk else [batch.queries]
        d_parts = [c.tokens for c in split_tokens(batch.documents, chunk)] if chunk else [batch.documents]
        q.append(torch.cat([enc.encode(t, side="query") for t in q_parts]))
        docs = torch.cat([enc.encode(t, side="document") for t in d_parts])
        pos.append(docs[:ROWS_PER_RANK])
        neg.append(docs[ROWS_PER_RANK:].view(ROWS_PER_RANK, NEGATIVES, -1))
        ids.append(batch.ids)
    gathered = TextIds(*(torch.cat([getattr(i, f) for i in ids]) for f in ("query_B", "positive_B", "negatives_Bk")))

    loss, _ = contrastive_loss(
        torch.cat(q),
        torch.cat(pos),
        torch.cat(neg),
        inverse_temperature=module.temperature(),
        ids=gathered,
        symmetric_weight=1.0,
    )
    loss.backward()
    return _grads(module)


def _throughput(rank: int, device: torch.device, world: int, steps: int = 5) -> float:
    """Global (query, positive, negatives) rows per second of forward + gather + loss + backward."""
    module = _module(device)
    batch = _rows(rank, device)
    start = time.perf_counter()
    for _ in range(steps):
        module.compute_loss(batch)[0].backward()
    barrier()
    return steps * ROWS_PER_RANK * world / (time.perf_counter() - start)


def run_checks() -> dict:
    """Join the launcher's process group, run the checks on every rank; the report (complete on rank 0)."""
    from embedscale.distributed import backend

    rank, world, device = _init()
    report: dict = {"world_size": world, "backend": backend(), "device": str(device), "checks": []}
    for name, chunk in (("gather + local loss", 0), ("gather + local loss + GradCache(chunk 2)", 2)):
        got = _distributed_grad(rank, device, chunk)
        if rank == 0:
            want = _reference_grad(world, device, chunk)
            rel = ((got - want).abs().max() / want.abs().max()).item()
            report["checks"].append({"check": f"{name} vs one process", "max_rel_diff": rel, "ok": rel < TOLERANCE})
    report["allgather_GBps"] = allgather_bandwidth(device)
    report["rows_per_s"] = _throughput(rank, device, world)
    report["rank"] = rank
    if rank == 0:
        report["ok"] = all(c["ok"] for c in report["checks"])
    return report
