"""Step cost of embedscale vs the bare limit and vs sentence-transformers, same model, batch and machine.

    python bench/step_throughput.py --global-batch 256 --chunk 32              # all datasets, all systems
    python bench/step_throughput.py --datasets fixed --systems bare,es-plain    # a subset

One optimizer step (forward, loss, backward, AdamW) of all-MiniLM-L6-v2 on `--global-batch` pairs,
one process, timed after a warm-up step on 16 pairs; each system runs in its own process (clean
peak RSS). Tokenisation happens before the clock starts, for every system alike.

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
- st-mnrl     sentence-transformers MultipleNegativesRankingLoss (scale 20)
- st-cached   sentence-transformers CachedMultipleNegativesRankingLoss, mini_batch_size = `--chunk`

Ratios: es-plain / bare and es-gc / bare-chunks are overheads (targets <= 1.05 and <= 1.10 in time);
st-* / es-* are speed-ups of embedscale (targets >= 1.0 on fixed, >= 1.1 for GradCache on real text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import report  # noqa: E402

SYSTEMS = ["bare", "bare-chunks", "es-plain", "st-mnrl", "es-gc", "es-gc-tok", "st-cached"]
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
    from embedscale.data.readers import resolve_data_root

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


def make_step(system: str, model_path: str, queries, docs, max_length: int, chunk: int):
    """A zero-argument function running one optimizer step on (queries, docs), and padded token count."""
    import torch
    import torch.nn.functional as F

    if system.startswith("st-"):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

        model = SentenceTransformer(model_path, device="cpu")
        model.max_seq_length = max_length
        if system == "st-mnrl":
            loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
        else:
            loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        features = [model.tokenize(queries), model.tokenize(docs)]
        padded = sum(f["input_ids"].numel() for f in features)

        def step():
            loss = loss_fn(features, torch.empty(0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, padded

    from transformers import AutoModel, AutoTokenizer

    if system.startswith("bare"):
        model = AutoModel.from_pretrained(model_path).train()
        tok = AutoTokenizer.from_pretrained(model_path)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        size = chunk if system == "bare-chunks" else len(queries)
        parts = [
            (tokenize(tok, queries[i : i + size], max_length), tokenize(tok, docs[i : i + size], max_length))
            for i in range(0, len(queries), size)
        ]
        padded = sum(q["input_ids"].numel() + d["input_ids"].numel() for q, d in parts)

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

        return step, padded

    from embedscale.config import LossConfig, ModelConfig, OptimConfig
    from embedscale.contrastive.gradcache import gradcache_step, split_tokens
    from embedscale.contrastive.module import ContrastiveModule
    from embedscale.data.batch import PairExample
    from embedscale.data.datamodule import PairCollator
    from embedscale.encoder.biencoder import load_encoder

    mcfg = ModelConfig(name_or_path=model_path, query_max_length=max_length, document_max_length=max_length)
    encoder, tok = load_encoder(mcfg)
    module = ContrastiveModule(encoder, loss_cfg=LossConfig(), optim_cfg=OptimConfig())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    batch = PairCollator(tok, model_cfg=encoder.cfg, num_hard_negatives=0)(
        [PairExample(q, d) for q, d in zip(queries, docs, strict=True)]
    )
    plan = {
        "es-plain": None,
        "es-gc": dict(chunk_size=chunk, sort_by_length=True),
        "es-gc-tok": dict(token_budget=chunk * 256),
    }[system]
    if plan is None:
        padded = batch.queries["input_ids"].numel() + batch.documents["input_ids"].numel()
    else:
        padded = sum(
            c.tokens["input_ids"].numel() for t in (batch.queries, batch.documents) for c in split_tokens(t, **plan)
        )

    def step():
        if plan is None:
            module.compute_loss(batch)[0].backward()
        else:
            gradcache_step(module, batch, **plan)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, padded


def child(system: str, dataset: str, n: int, chunk: int, threads: int) -> dict:
    import torch

    from embedscale.encoder.biencoder import resolve_model_path

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_path = str(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    from transformers import AutoTokenizer

    queries, docs, max_length = load_pairs(dataset, n, AutoTokenizer.from_pretrained(model_path))
    warm, _ = make_step(system, model_path, queries[:16], docs[:16], max_length, min(chunk, 8))
    warm()
    step, padded = make_step(system, model_path, queries, docs, max_length, chunk)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "padded_tokens": padded, "peak_rss_MiB": round(max(peak, rss_before) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="step_throughput")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, dataset = args.child
        print(json.dumps(child(system, dataset, args.global_batch, args.chunk, args.threads)))
        return
    rows = []
    for dataset in args.datasets.split(","):
        results = {}
        for system in args.systems.split(","):
            cmd = [sys.executable, __file__, "--child", system, dataset, "--global-batch", str(args.global_batch)]
            cmd += ["--chunk", str(args.chunk), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{system} on {dataset} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[system] = r
            print(f"{dataset} {system}: {r}", flush=True)
        for system, r in results.items():
            row = {
                "dataset": dataset,
                "system": system,
                "pairs": args.global_batch,
                "seconds": round(r["seconds"], 1),
                "pairs/s": round(args.global_batch / r["seconds"], 2),
                "padded_tokens": r["padded_tokens"],
                "peak_rss_MiB": r["peak_rss_MiB"],
                "vs": "",
            }
            ref = {"es-plain": "bare", "es-gc": "bare-chunks", "es-gc-tok": "bare-chunks"}.get(system)
            if ref in results:
                row["vs"] = f"{r['seconds'] / results[ref]['seconds']:.3f}x time of {ref}"
            peers = {"st-mnrl": ["es-plain"], "st-cached": ["es-gc", "es-gc-tok"]}.get(system, [])
            speedups = [f"{p} {r['seconds'] / results[p]['seconds']:.3f}x" for p in peers if p in results]
            if speedups:
                row["vs"] = "embedscale speed-up: " + ", ".join(speedups)
            rows.append(row)
    report(args.name, rows, {"global_batch": args.global_batch, "chunk": args.chunk, "threads": args.threads})


if __name__ == "__main__":
    main()
