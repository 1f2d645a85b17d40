"""Step cost of embedscale vs the bare limit and vs sentence-transformers, same model, batch and machine.

    python bench/step_throughput.py --global-batch 256 --chunk 32              # all datasets, all systems
    python bench/step_throughput.py --datasets fixed --systems bare,es-plain    # a subset
    python bench/step_throughput.py --datasets fixed --global-batch 4 --chunk 2 --repeats 1 --interleave \
        --model PATH                                                            # a smoke run: seconds

One optimizer step (forward, loss, backward, AdamW) of all-MiniLM-L6-v2 on `--global-batch` pairs,
one process per system (clean peak RSS): one untimed warm-up step at full size, then the median of
`--repeats` timed steps (the first step at a new size pays the allocator's growth -- 12 GiB of page
faults for a whole 128-pair batch -- which a training run pays once, not per step). Tokenisation
happens before the clock starts, for every system alike. With `--interleave` all systems share one
process and the timed steps go round-robin (order rotated each round); ratios are then medians of
per-round ratios. On this 2-core VM whole-batch steps vary by +-10% from step to step, so only
interleaved ratios are worth comparing at the 5% level; peak RSS is per system only without it.

Datasets: `fixed` = synthetic text of exactly 128 tokens per query and document; `scifact` and
`medquad` = the first pairs of a fixed shuffle of the real training pairs, queries and documents
truncated at 256 tokens (padding varies).

Systems:
- bare        HF AutoModel, mean pooling, L2 norm, cross-entropy over q @ d.T * 20, whole batch at once
- bare-chunks the same, run as chunk-size batches with gradient accumulation: the limit for GradCache,
              which must see the same samples (its loss is over the whole batch, theirs per chunk)
- es-plain    embedscale ContrastiveModule.compute_loss (masking, metrics) + backward + AdamW
- es-gc       embedscale GradCache, chunks of `--chunk` rows, trimmed, sorted by length
- es-gc-tok   embedscale GradCache with a token budget of chunk x 256 padded tokens per chunk
- bare-gc     GradCache's own chunks (es-gc's: `--chunk` rows, sorted by length, trimmed), each encoded once with
              gradient (mean pooling, L2 norm, a fixed random cotangent) and AdamW: GradCache's second pass alone,
              without its gradient-free first pass or the loss -- the strict limit for es-gc
- bare-gc-tok the same on es-gc-tok's chunks (the same token budget): the strict limit for es-gc-tok
- st-mnrl     sentence-transformers MultipleNegativesRankingLoss (scale 20)
- st-cached   sentence-transformers CachedMultipleNegativesRankingLoss, mini_batch_size = `--chunk`
- st-cached-tok  the same with mini_batch_num_tokens = `--chunk` x 256 (`:N` sets it): its chunks hold at most N
              real (non-padding) tokens, where es-gc-tok's budget counts padded tokens (rows x the chunk's longest)

A system name may end in `@eager` or `@sdpa` to pin the attention kernel (`bare-chunks@eager`,
`st-cached@eager`, `es-gc@sdpa`); without it every system loads transformers' default (sdpa).
`:N` sets a system's own chunk: rows for bare-chunks, es-gc and st-cached (its mini_batch_size),
padded tokens per chunk for es-gc-tok and real tokens for st-cached-tok (`es-gc-tok:4096`, `st-cached:16`);
default `--chunk` rows and `--chunk` x 256 tokens.

`--dropout P` sets every dropout probability of the backbone to P for every system (embedscale's model.dropout;
transformers' config overrides for the others); default: the checkpoint's (0.1 for all-MiniLM-L6-v2).

`--allocator` sets the host allocator of the timing process, for every system alike (runtime.tune_allocator, the
training jobs' trainer.host_allocator): `glibc` (default, glibc's own dynamic mmap threshold, as all figures before
2026-12-06), `lean` (what a training job does by default: blocks of 1 MiB and more are mmap'ed and unmapped when
freed, so every step faults its large blocks in again) or `reuse` (freed memory stays in the heap: no page faults
after the warm-up, so the systems are compared on compute alone).

`--model` replaces all-MiniLM-L6-v2 (for smoke runs with a tiny model, tests/test_bench_smoke.py; `fixed` needs
128 positions, the real datasets 256); the figures are only comparable with the default.

Columns: `padded_tokens` = the tokens one pass of the system encodes, padding included, over its own chunks
(sentence-transformers >= 6 trims each mini-batch to the longest of its rows, and is counted so);
`largest_chunk` = the tokens of its largest chunk, which bounds the activation memory a pass holds (compare it for
equal-memory pairings); `minor_faults` and `system_s` = the median step's minor page faults and kernel CPU seconds
(getrusage around each timed step: a minor fault is a fresh page touched for the first time, and how often a step
touches fresh pages is the allocator setting's doing, `--allocator`).

Ratios: es-plain / bare and es-gc / bare-chunks are overheads (targets <= 1.05 and <= 1.10 in time);
st-* / es-* are speed-ups of embedscale (targets >= 1.0 on fixed, >= 1.1 for GradCache on real text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import report  # noqa: E402

SYSTEMS = ["bare", "bare-chunks", "es-plain", "st-mnrl", "es-gc", "es-gc-tok", "st-cached", "st-cached-tok"]
LIMITS = ["bare-gc", "bare-gc-tok"]  # not in the default set: --systems names them
DATASETS = ["fixed", "scifact", "medquad"]
WORDS = "alpha beta gamma delta protein cell gene model data signal drug trial dose risk patient".split()


def load_pairs(dataset: str, n: int, tokenizer) -> tuple[list[str], list[str], int]:
    """(queries, documents, max_length) for a dataset; fixed-length text is exactly 128 tokens."""
    if dataset == "fixed":
        rng = random.Random(0)

        def text() -> str:  # > 128 word pieces, truncated to exactly 128 tokens with [CLS]/[SEP]
            ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(200)), truncation=True, max_length=128)
            return tokenizer.decode(ids["input_ids"][1:-1])

        return [text() for _ in range(n)], [text() for _ in range(n)], 128
    from embedscale.config import DataConfig, DataFormat
    from embedscale.data.datamodule import load_examples
    from embedscale.data.records import resolve_data_root

    cfg = {
        "scifact": DataConfig(format=DataFormat.beir, path="scifact", split="train"),
        "medquad": DataConfig(format=DataFormat.jsonl, path="medquad/pairs.jsonl.gz"),
    }[dataset]
    examples = load_examples(cfg, resolve_data_root(None))
    random.Random(0).shuffle(examples)
    seen, picked = set(), []
    for ex in examples:  # distinct texts: ST's loss has no duplicate masking, keep the batches alike
        if ex.query not in seen and ex.positive not in seen:
            seen.update((ex.query, ex.positive))
            picked.append(ex)
        if len(picked) == n:
            break
    return [e.query for e in picked], [e.positive for e in picked], 256


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def parse_system(name: str) -> tuple[str, int | None, str]:
    """`base[:N][@attn]` -> (base, N or None, attn or "")."""
    rest, _, attn = name.partition("@")
    base, _, own = rest.partition(":")
    return base, int(own) if own else None, attn


def encoded(ids: list) -> tuple[int, int]:
    """(tokens, largest chunk's tokens) of the input_ids tensors a step encodes, padding included."""
    sizes = [t.numel() for t in ids]
    return sum(sizes), max(sizes)


def st_chunks(loss_fn, features: list[dict]) -> list:
    """The input_ids a sentence-transformers cached loss encodes: its own mini-batch ranges, each trimmed of the
    trailing padding its rows share (the locked sentence-transformers 6.x trims; its private helpers say how)."""
    from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges

    budget = loss_fn.mini_batch_num_tokens
    return [
        _create_minibatch(f, b, e)["input_ids"]
        for f in features
        for b, e in _minibatch_ranges(f, loss_fn.mini_batch_size, budget)
    ]


def make_step(system: str, model_path: str, queries, docs, max_length: int, chunk: int, dropout: float | None = None):
    """(a zero-argument function running one optimizer step on (queries, docs), the tokens it encodes per pass,
    padding included, and its largest chunk's tokens: the activation memory a pass holds scales with it)."""
    import torch
    import torch.nn.functional as F

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import dropout_overrides

    system, own, attn = parse_system(system)
    budgeted = system in ("es-gc-tok", "st-cached-tok", "bare-gc-tok")
    budget = own if own and budgeted else chunk * 256
    chunk = own if own and not budgeted else chunk
    config = dropout_overrides(model_path, ModelConfig(dropout=dropout)) if dropout is not None else {}
    if system.startswith("st-"):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

        model = SentenceTransformer(
            model_path,
            device="cpu",
            model_kwargs={"attn_implementation": attn} if attn else None,
            config_kwargs=config or None,
        )
        model.max_seq_length = max_length
        if system == "st-mnrl":
            loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
        elif system == "st-cached-tok":  # rows unbounded: the token count alone cuts the chunks
            loss_fn = CachedMultipleNegativesRankingLoss(
                model, scale=20.0, mini_batch_size=len(queries), mini_batch_num_tokens=budget
            )
        else:
            loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        features = [model.tokenize(queries), model.tokenize(docs)]
        if system == "st-mnrl":
            padded, largest = encoded([f["input_ids"] for f in features])
        else:  # the mini-batches it encodes, trimmed
            padded, largest = encoded(st_chunks(loss_fn, features))

        def step():
            loss = loss_fn(features, torch.empty(0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, padded, largest

    from transformers import AutoModel, AutoTokenizer

    if system in ("bare-gc", "bare-gc-tok"):  # GradCache's own chunks, each encoded once with gradient
        from embedscale.contrastive.gradcache import split_tokens

        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModel.from_pretrained(model_path, **kwargs, **config).train()
        tok = AutoTokenizer.from_pretrained(model_path)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        plan = dict(chunk_size=chunk, sort_by_length=True) if system == "bare-gc" else dict(token_budget=budget)
        chunks = [c.tokens for texts in (queries, docs) for c in split_tokens(tokenize(tok, texts, max_length), **plan)]
        padded, largest = encoded([c["input_ids"] for c in chunks])
        hidden = model.config.hidden_size
        cotangents = [
            torch.randn(len(c["input_ids"]), hidden, generator=torch.Generator().manual_seed(i))
            for i, c in enumerate(chunks)
        ]

        def step():
            for c, g in zip(chunks, cotangents, strict=True):
                h = model(**c).last_hidden_state
                m = c["attention_mask"].unsqueeze(-1).to(h.dtype)
                (F.normalize((h * m).sum(1) / m.sum(1), dim=-1) * g).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, padded, largest

    if system.startswith("bare"):
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModel.from_pretrained(model_path, **kwargs, **config).train()
        tok = AutoTokenizer.from_pretrained(model_path)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        size = chunk if system == "bare-chunks" else len(queries)
        parts = [
            (tokenize(tok, queries[i : i + size], max_length), tokenize(tok, docs[i : i + size], max_length))
            for i in range(0, len(queries), size)
        ]
        padded, largest = encoded([t["input_ids"] for part in parts for t in part])

        def embed(tokens):
            h = model(**tokens).last_hidden_state
            m = tokens["attention_mask"].unsqueeze(-1).to(h.dtype)
            return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

        def step():
            for q, d in parts:
                s = embed(q) @ embed(d).T * 20.0
                (F.cross_entropy(s, torch.arange(len(s))) * len(s) / len(queries)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, padded, largest

    from embedscale.config import GradCacheConfig, LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.gradcache import gradcache_step, split_tokens
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairExample
    from embedscale.data.collate import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    mcfg = ModelConfig(
        name_or_path=model_path,
        query_max_length=max_length,
        document_max_length=max_length,
        attn_implementation=attn or None,
        dropout=dropout,
    )
    encoder, tok = load_encoder(mcfg)
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    batch = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)(
        [PairExample(q, d) for q, d in zip(queries, docs, strict=True)]
    )
    plan = {
        "es-plain": None,
        "es-gc": dict(chunk_size=chunk, sort_by_length=True),
        "es-gc-tok": dict(token_budget=budget),
    }[system]
    if plan is None:
        padded, largest = encoded([batch.queries["input_ids"], batch.documents["input_ids"]])
    else:
        padded, largest = encoded(
            [c.tokens["input_ids"] for t in (batch.queries, batch.documents) for c in split_tokens(t, **plan)]
        )

    def step():
        if plan is None:
            module.compute_loss(batch)[0].backward()
        else:
            gradcache_step(module, batch, plan=GradCacheConfig(**plan))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, padded, largest


def child(
    systems: list[str],
    dataset: str,
    n: int,
    chunk: int,
    threads: int,
    repeats: int,
    model: str | None = None,
    dropout: float | None = None,
    allocator: str = "glibc",
) -> dict:
    """Time `systems` in this process: one untimed full-size warm-up each, then `repeats` rounds.

    With several systems the rounds interleave them (rotating the order each round), so a drift of
    the machine (allocator state, a noisy neighbour) hits all of them alike."""
    import torch

    from embedscale.encoder.biencoder import resolve_model_path
    from embedscale.runtime import tune_allocator

    tune_allocator(allocator)  # before any large block: the whole process, every system alike
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_path = model or str(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    from transformers import AutoTokenizer

    queries, docs, max_length = load_pairs(dataset, n, AutoTokenizer.from_pretrained(model_path))
    steps = {s: make_step(s, model_path, queries, docs, max_length, chunk, dropout) for s in systems}
    for step, *_ in steps.values():
        step()  # warm-up at full size: the allocator's first growth and lazy inits are paid once per run
    times: dict[str, list[float]] = {s: [] for s in systems}
    faults: dict[str, list[int]] = {s: [] for s in systems}  # minor page faults per step (first-touch of new pages)
    kernel: dict[str, list[float]] = {s: [] for s in systems}  # system CPU seconds per step (the faults' cost)
    for r in range(repeats):
        for system in systems[r % len(systems) :] + systems[: r % len(systems)]:
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            steps[system][0]()
            times[system].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[system].append(after.ru_minflt - before.ru_minflt)
            kernel[system].append(after.ru_stime - before.ru_stime)
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        s: {
            "seconds": statistics.median(times[s]),
            "all_seconds": [round(t, 2) for t in times[s]],
            "padded_tokens": steps[s][1],
            "largest_chunk_tokens": steps[s][2],
            "minor_faults": int(statistics.median(faults[s])),
            "system_s": round(statistics.median(kernel[s]), 2),
            "peak_rss_MiB": peak if len(systems) == 1 else f"{peak} (process, all systems)",
        }
        for s in systems
    }


def ratio_stats(a: dict, b: dict) -> dict:
    """The per-round time ratios a / b (rounds pair up when interleaved): median, min, max, rounds."""
    per_round = [x / y for x, y in zip(a["all_seconds"], b["all_seconds"], strict=True)]
    return {
        "median": round(statistics.median(per_round), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
        "rounds": len(per_round),
    }


def spread(stats: dict) -> str:
    return f"{stats['median']:.3f}x [{stats['min']:.3f}-{stats['max']:.3f}, {stats['rounds']} rounds]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up; the median is reported")
    parser.add_argument(
        "--interleave", action="store_true", help="time all systems in one process, round-robin (timing only)"
    )
    parser.add_argument("--model", default=None, help="model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--dropout", type=float, default=None, help="every system's dropout (default: the model's)")
    parser.add_argument(
        "--allocator",
        default="glibc",
        choices=("glibc", "lean", "reuse"),
        help="the process's host allocator (trainer.host_allocator, runtime.tune_allocator); default glibc's own",
    )
    parser.add_argument("--name", default="step_throughput")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        systems, dataset = args.child
        out = child(
            systems.split(","),
            dataset,
            args.global_batch,
            args.chunk,
            args.threads,
            args.repeats,
            args.model,
            args.dropout,
            args.allocator,
        )
        print(json.dumps(out))
        return
    rows, ratios = [], []  # ratios: every pairing's per-round time ratios (median, min, max)
    for dataset in args.datasets.split(","):
        results = {}
        groups = [args.systems] if args.interleave else args.systems.split(",")
        for group in groups:
            cmd = [sys.executable, __file__, "--child", group, dataset, "--global-batch", str(args.global_batch)]
            cmd += ["--chunk", str(args.chunk), "--threads", str(args.threads), "--repeats", str(args.repeats)]
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--dropout", str(args.dropout)] if args.dropout is not None else []
            cmd += ["--allocator", args.allocator]
            env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "EMBEDSCALE_MALLOC")}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{group} on {dataset} failed:\n{out.stderr[-3000:]}")
            for system, r in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[system] = r
                print(f"{dataset} {system}: {r}", flush=True)
        for system, r in results.items():
            row = {
                "dataset": dataset,
                "system": system,
                "pairs": args.global_batch,
                "seconds": round(r["seconds"], 1),
                "all_s": " ".join(f"{t:.1f}" for t in r["all_seconds"]),
                "pairs/s": round(args.global_batch / r["seconds"], 2),
                "padded_tokens": r["padded_tokens"],
                "largest_chunk": r.get("largest_chunk_tokens"),
                "minor_faults": r.get("minor_faults"),
                "system_s": r.get("system_s"),
                "peak_rss_MiB": r["peak_rss_MiB"],
                "vs": "",
            }
            base = parse_system(system)[0]
            ref = {
                "es-plain": ["bare"],
                "es-gc": ["bare-chunks", "bare-gc"],
                "es-gc-tok": ["bare-chunks", "bare-gc-tok"],
            }
            refs = [x for x in results if parse_system(x)[0] in ref.get(base, [])]
            for x in refs:
                ratios.append({"dataset": dataset, "time_of": system, "over": x, **ratio_stats(r, results[x])})
            if refs:
                row["vs"] = ", ".join(f"{spread(ratio_stats(r, results[x]))} time of {x}" for x in refs)
            peers = {
                "st-mnrl": ["es-plain"],
                "st-cached": ["es-gc", "es-gc-tok"],
                "st-cached-tok": ["es-gc", "es-gc-tok"],
            }
            peers = peers.get(base, [])
            speedups = [p for p in results if parse_system(p)[0] in peers]
            for p in speedups:
                ratios.append({"dataset": dataset, "time_of": system, "over": p, **ratio_stats(r, results[p])})
            if speedups:
                row["vs"] = "embedscale speed-up: " + ", ".join(
                    f"{p} {spread(ratio_stats(r, results[p]))}" for p in speedups
                )
            rows.append(row)
    report(
        args.name,
        rows,
        {
            "global_batch": args.global_batch,
            "chunk": args.chunk,
            "threads": args.threads,
            "repeats": args.repeats,
            **({"model": args.model} if args.model else {}),
            "dropout": args.dropout,
            "allocator": args.allocator,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
