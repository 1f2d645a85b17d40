"""Job `embedscale doctor`: check, on the real launcher and backend, that large-batch training is exact.

    embedscale doctor                                      # one process (spawns nothing)
    torchrun --nproc_per_node=2 -m embedscale.doctor       # every rank of the real launcher
    srun python -m embedscale.doctor --json                # same under SLURM, machine-readable

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

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

ROWS_PER_RANK, NEGATIVES, SEQ, VOCAB = 4, 1, 12, 500
TOLERANCE = 1e-5


def _init() -> tuple[int, int, torch.device]:
    from embedscale.retrieval.index import init_distributed_from_env

    init_distributed_from_env()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    return rank, world, torch.device("cpu")


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
    from embedscale.contrastive.gather import all_reduce_gradients_
    from embedscale.contrastive.gradcache import gradcache_step

    module = _module(device)
    torch.manual_seed(77 + rank)
    if chunk:
        gradcache_step(module, _rows(rank, device), chunk_size=chunk)
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


def _bandwidth(device: torch.device, world: int, megabytes: int = 16, iters: int = 5) -> float:
    """All-gather bus bandwidth in GB/s ((W-1)/W x gathered bytes / time), 0 for one process."""
    if world == 1:
        return 0.0
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_gather(out, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return (world - 1) / world * world * x.numel() * 4 / seconds / 1e9


def _throughput(rank: int, device: torch.device, world: int, steps: int = 5) -> float:
    """Global (query, positive, negatives) rows per second of forward + gather + loss + backward."""
    module = _module(device)
    batch = _rows(rank, device)
    start = time.perf_counter()
    for _ in range(steps):
        module.compute_loss(batch)[0].backward()
    if dist.is_initialized():
        dist.barrier()
    return steps * ROWS_PER_RANK * world / (time.perf_counter() - start)


def run(as_json: bool = False) -> dict:
    rank, world, device = _init()
    report: dict = {
        "world_size": world,
        "backend": dist.get_backend() if dist.is_initialized() else "none",
        "device": str(device),
        "checks": [],
    }
    for name, chunk in (("gather + local loss", 0), ("gather + local loss + GradCache(chunk 2)", 2)):
        got = _distributed_grad(rank, device, chunk)
        if rank == 0:
            want = _reference_grad(world, device, chunk)
            rel = ((got - want).abs().max() / want.abs().max()).item()
            report["checks"].append({"check": f"{name} vs one process", "max_rel_diff": rel, "ok": rel < TOLERANCE})
    report["allgather_GBps"] = _bandwidth(device, world)
    report["rows_per_s"] = _throughput(rank, device, world)
    if rank == 0:
        report["ok"] = all(c["ok"] for c in report["checks"])
        _print(report, as_json)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return report


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedscale doctor: {report['world_size']} rank(s), {report['backend']}, {report['device']}")
    for col in ("check", "value", "verdict"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(c["check"], f"max rel diff {c['max_rel_diff']:.1e}", "[green]OK" if c["ok"] else "[red]WRONG")
    table.add_row("all-gather bandwidth", f"{report['allgather_GBps']:.2f} GB/s", "-")
    table.add_row("step throughput (tiny model)", f"{report['rows_per_s']:.0f} rows/s", "-")
    Console().print(table)
    print("verdict:", "exact" if report["ok"] else "GRADIENTS DIFFER: do not train at scale on this setup")


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="embedscale doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = run(as_json=args.json)
    return 0 if report.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
