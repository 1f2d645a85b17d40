"""Gather-with-gradient + local loss on W gloo ranks gives the one-process full-batch gradient.

Dropout is on. To give every configuration the same dropout masks, the one-process reference encodes
the batch in W chunks, seeding chunk r exactly as rank r seeds its own forward; chunked encoding does
not change the full-batch gradient (no batch statistics in a transformer). Texts are padded to a
fixed length so that mask shapes agree. float64 throughout.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from dist import spawn

from embedscale.config import LossConfig, ModelConfig, OptimConfig
from embedscale.data.batch import Objective, PairExample, TextIds, text_id
from embedscale.distributed import traffic_bytes

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)

N, K, LEN = 8, 1, 16


def examples() -> list[PairExample]:
    rows = [PairExample(f"query about topic {i}", f"document on topic {i}", [f"unrelated text {i}"]) for i in range(N)]
    rows[5].positive = rows[1].positive  # duplicate positive across ranks 0 and 1 (W=2) / 0 and 2 (W=4)
    rows[6].query = rows[2].query  # same query text on two ranks
    rows[3].negatives = [rows[7].positive]  # a hard negative equal to a positive on another rank
    return rows


def build(tiny_bert: str, cfg: dict):
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.encoder.biencoder import load_encoder

    torch.manual_seed(0)
    mcfg = ModelConfig(name_or_path=tiny_bert, shared_towers=cfg["shared"], matryoshka_dims=cfg["matryoshka"])
    encoder, tokenizer = load_encoder(mcfg)
    lcfg = LossConfig(
        symmetric_weight=cfg["symmetric"],
        learnable_temperature=True,
        distill_weight=cfg.get("distill", 0.0),
        query_query=cfg.get("qq", False),
        document_document=cfg.get("dd", False),
        margin_guard=cfg.get("margin"),
    )
    module = ContrastiveModule(encoder.double(), loss_cfg=lcfg, optim_cfg=OptimConfig()).double().train()
    return module, tokenizer


def encode_rows(module, tokenizer, rows: list[PairExample], seed: int):
    """Rank-style forward of some rows: seed, queries, then [positives | negatives] as one document batch."""
    tok = lambda texts: {  # noqa: E731
        k: v
        for k, v in tokenizer(texts, padding="max_length", max_length=LEN, truncation=True, return_tensors="pt").items()
        if k in ("input_ids", "attention_mask")
    }
    torch.manual_seed(seed)
    b = len(rows)
    q = module.encoder.encode(tok([r.query for r in rows]), side="query")
    docs = module.encoder.encode(
        tok([r.positive for r in rows] + [n for r in rows for n in r.negatives]), side="document"
    )
    ids = TextIds(
        torch.tensor([text_id(r.query) for r in rows]),
        torch.tensor([text_id(r.positive) for r in rows]),
        torch.tensor([[text_id(n) for n in r.negatives] for r in rows]),
    )
    return q, docs[:b], docs[b:].view(b, K, -1), ids


def teacher(lo: int, hi: int, cfg: dict) -> torch.Tensor | None:
    """Teacher scores of rows lo..hi over [positive, negative] (distillation cases only)."""
    if not cfg.get("distill"):
        return None
    return torch.tensor([[1.0 + 0.1 * i, 0.5 - 0.3 * i] for i in range(lo, hi)], dtype=torch.float64)


def objective_of(lo: int, hi: int, cfg: dict) -> Objective | None:
    """Rows lo..hi's targets of a per-source objective (data.sources[].loss cases only): gold scores with ties, or a
    teacher's embeddings (the model's dimension 32 for mse, 24 for kl: kl compares scores only)."""
    kind = cfg.get("objective")
    if kind is None:
        return None
    if kind in ("cosent", "angle"):
        scores = torch.tensor([4.0, 1.5, 1.5, 0.2, 3.0, 5.0, 1.5, 2.5], dtype=torch.float64)
        return Objective(kind, 0.7, scores_B=scores[lo:hi])
    g = torch.Generator().manual_seed(7)
    T = 32 if kind == "mse" else 24
    teacher_q = torch.nn.functional.normalize(torch.randn(N, T, generator=g, dtype=torch.float64), dim=-1)
    teacher_pos = torch.nn.functional.normalize(torch.randn(N, T, generator=g, dtype=torch.float64), dim=-1)
    return Objective(kind, 0.7, teacher_query_BT=teacher_q[lo:hi], teacher_positive_BT=teacher_pos[lo:hi])


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def guide_of(module, tokenizer, rows: list[PairExample], cfg: dict):
    """The guide's (queries, positives, negatives) of some rows (guide cases only): a frozen, dropout-free copy of
    the starting encoder, as loss.guide_model would load the starting checkpoint."""
    if not cfg.get("guide"):
        return None
    import copy

    guide = copy.deepcopy(module.encoder).eval()
    with torch.no_grad():
        q, pos, neg, _ = encode_rows(SimpleNamespace(encoder=guide), tokenizer, rows, seed=0)
    return q, pos, neg


def _rank(rank: int, world_size: int, tiny_bert: str, cfg: dict, out: str) -> None:
    module, tokenizer = build(tiny_bert, cfg)
    b = N // world_size
    rows = examples()[rank * b : (rank + 1) * b]
    teacher_BG = teacher(rank * b, (rank + 1) * b, cfg)
    guide = guide_of(module, tokenizer, rows, cfg)
    embeddings = encode_rows(module, tokenizer, rows, seed=100 + rank)
    objective = objective_of(rank * b, (rank + 1) * b, cfg)
    before = traffic_bytes()
    loss, metrics = module.loss_from_embeddings(*embeddings, teacher_BG=teacher_BG, guide=guide, objective=objective)
    loss.backward()
    for key, on in (("margin_guard_masked", cfg.get("margin") is not None), ("guide_masked", cfg.get("guide"))):
        if on:  # the guard really masked something, on some rank (all ranks take part in the sum)
            total = metrics[key].clone()
            dist.all_reduce(total)
            assert total > 0, key
    # what this rank received: the other ranks' gradient shares of its query, positive and negative embeddings
    local = sum(e.numel() * e.element_size() for e in embeddings[:3] if e is not None)
    if objective is not None:  # cosent, angle: the pair similarities (b per dimension); kl: queries and positives
        sims = b * 8 * max(1, len(cfg["matryoshka"]))
        local = {"cosent": sims, "angle": sims, "mse": 0}.get(cfg["objective"], local - embeddings[2].numel() * 8)
    assert traffic_bytes()["reduce_scattered"] - before["reduce_scattered"] == local * (world_size - 1)
    assert traffic_bytes()["gathered"] - before["gathered"] >= local * (world_size - 1)  # (+ the ids)
    for p in module.parameters():  # what DDP does: average the gradients over ranks
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    if rank == 0:
        torch.save(grads(module), out)


def reference(tiny_bert: str, cfg: dict, chunks: int) -> dict[str, torch.Tensor]:
    module, tokenizer = build(tiny_bert, cfg)
    b = N // chunks
    parts = [encode_rows(module, tokenizer, examples()[r * b : (r + 1) * b], seed=100 + r) for r in range(chunks)]
    q, pos, neg = (torch.cat([p[i] for p in parts]) for i in range(3))
    ids = TextIds(*(torch.cat([getattr(p[3], f) for p in parts]) for f in ("query_B", "positive_B", "negatives_Bk")))
    guide = guide_of(module, tokenizer, examples(), cfg)
    objective = objective_of(0, N, cfg)
    loss, _ = module.loss_from_embeddings(
        q, pos, neg, ids, teacher_BG=teacher(0, N, cfg), guide=guide, objective=objective
    )
    loss.backward()
    return grads(module)


CASES = {
    "shared, symmetric, matryoshka": {"shared": True, "symmetric": 1.0, "matryoshka": [32, 16]},
    "separate towers, q->d only": {"shared": False, "symmetric": 0.0, "matryoshka": []},
    "distillation from teacher scores": {"shared": True, "symmetric": 0.0, "matryoshka": [], "distill": 0.5},
    "q->q and d->d terms, symmetric": {"shared": False, "symmetric": 0.5, "matryoshka": [], "qq": True, "dd": True},
    "margin guard 0.02": {"shared": True, "symmetric": 0.0, "matryoshka": [], "margin": 0.02},
    "guide model (GISTEmbed)": {"shared": False, "symmetric": 0.0, "matryoshka": [], "guide": True},
    "CoSENT source, matryoshka": {"shared": True, "symmetric": 0.0, "matryoshka": [32, 16], "objective": "cosent"},
    "AnglE source": {"shared": False, "symmetric": 0.0, "matryoshka": [], "objective": "angle"},
    "MSE to teacher embeddings": {"shared": True, "symmetric": 0.0, "matryoshka": [], "objective": "mse"},
    "KL to teacher embeddings": {"shared": False, "symmetric": 0.0, "matryoshka": [], "objective": "kl"},
}


OBJECTIVES = {"CoSENT source, matryoshka", "AnglE source", "MSE to teacher embeddings", "KL to teacher embeddings"}
# the per-source objectives at W = 2 here (CI's time budget); W = 4 is in bench/results/loss_equivalence.json
RUNS = [(w, case) for case in CASES for w in ([2] if case in OBJECTIVES else [2, 4])]


@pytest.mark.parametrize(("world_size", "case"), RUNS)
def test_multi_rank_gradient_equals_one_process(tiny_bert, tmp_path, world_size, case):
    cfg = CASES[case]
    out = tmp_path / "grads.pt"
    spawn(_rank, world_size, str(tiny_bert), cfg, str(out))
    got, want = torch.load(out), reference(str(tiny_bert), cfg, chunks=world_size)
    assert set(got) == set(want) and "temperature.log_inverse" in got
    flat_got, flat_want = (torch.cat([g[n].reshape(-1) for n in sorted(want)]) for g in (got, want))
    worst = ((flat_got - flat_want).abs().max() / flat_want.abs().max()).item()
    print(f"{case} W={world_size}: max |difference| / max |gradient| = {worst:.1e}")
    assert worst < 1e-10
    for name in want:  # attention key biases have exactly-zero true gradients: compare with an absolute floor
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12, msg=name)


def test_lightning_ddp_with_gradcache_equals_one_process(tiny_bert_nodrop, tiny_data, tmp_path):
    """`trainer=ddp_cpu` (2 processes) + GradCache chunk 2 trains 3 shuffled optimizer steps to the weights of one
    process on the same global batch of 8 (no dropout here: the runs draw different random streams)."""
    from helpers import train_processes
    from safetensors.torch import load_file

    common = [
        f"model.name_or_path={tiny_bert_nodrop}",
        "model.query_max_length=16",
        "model.document_max_length=32",
        f"data.root={tiny_data}",
        "data.path=tiny",
        "trainer.max_steps=3",
        "trainer.max_epochs=3",
        "eval=none",
        "logger=none",
        "optim.lr=1e-3",
        "trainer.progress=off",
        "trainer.num_threads=1",
    ]
    runs = {
        "ddp": [*common, "trainer=ddp_cpu", "data.batch_size_per_rank=4", "gradcache.chunk_size=2"],
        "single": [*common, "data.batch_size_per_rank=8"],
    }
    train_processes(runs, tmp_path)  # side by side
    ddp, single = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("ddp", "single"))
    start = load_file(tiny_bert_nodrop / "model.safetensors")
    assert set(ddp) == set(single)
    moved = max((single[n] - start[n]).abs().max().item() for n in single if n in start)
    assert moved > 1e-3  # the weights really trained
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_doctor_under_torchrun_two_ranks():
    """`torchrun --standalone --nproc_per_node=2 -m embedscale.doctor --json` reports exact gradients."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "embedscale.jobs.doctor",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert len(report["checks"]) == 2 and all(c["ok"] and c["max_rel_diff"] < 1e-10 for c in report["checks"])
    assert report["allgather_GBps"] > 0 and report["rows_per_s"] > 0


_LEAK_SCRIPT = """
import os, torch.distributed as dist
from embedscale.distributed import init_from_env as init_distributed_from_env
init_distributed_from_env()
from embedscale import diagnostics as doctor
doctor._module(doctor._init()[2])  # Lightning + transformers model classes, imported after the group exists
dist.barrier()
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
line = f"gloo threads after destroy: {sorted(n for n in names if 'gloo' in n)}\\n"
os.write(1, line.encode())  # one write per rank: print() writes text and newline apart, so ranks interleave
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux /proc")
def test_destroy_process_group_really_frees_gloo():
    """The CI abort at exit ("terminate called without an active exception"): a gloo group still alive at
    interpreter shutdown. init_distributed_from_env must leave a group that destroy_process_group frees
    (its worker threads joined) even when Lightning/transformers are imported after it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    cmd += [sys.executable, "-c", _LEAK_SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gloo threads after destroy: []") == 2, proc.stdout
