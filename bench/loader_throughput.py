"""Loader speed: read + decode + tokenise samples/s of the shard stream vs a plain JSONL reader vs training.

    python bench/loader_throughput.py --workers 2 --batches 150

MedQuAD pairs (../shared/data/medquad/pairs.jsonl.gz, 16,359 pairs, documents up to 256 tokens)
are sharded once into a temporary directory (`embedscale shard`, 1,000 samples per shard), then:

- `stream`: embedscale's `MixtureStream` (seeded order, index seeks into the tars, JSON decode,
  all-MiniLM-L6-v2 tokenisation in the collate) through a DataLoader with `--workers` workers;
- `jsonl`: the plain way -- read the gzipped JSONL line by line, json.loads, the same collate, in
  the main process (what `data.format=jsonl` does, minus its up-front read);
- `training`: what MiniLM training consumes on this machine, from bench/results/step_throughput_real.json
  (GradCache on MedQuAD at global batch 256, the fastest training path measured here).

Target (issue 4): loader >= 5x what training consumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import COMMITTED, RESULTS, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from embedscale.config import ModelConfig, ShardConfig, ShardJobConfig
    from embedscale.data.batch import PairExample
    from embedscale.data.collate import PairCollator
    from embedscale.data.records import resolve_data_root
    from embedscale.data.shards import ShardedDataset
    from embedscale.data.stream import MixtureStream, Source
    from embedscale.encoder.biencoder import resolve_model_path
    from embedscale.jobs.shard import run as shard_run

    torch.set_num_threads(1)
    model_cfg = ModelConfig()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name_or_path))
    collate = PairCollator(tok, model_cfg=model_cfg, num_hard_negatives=0)
    source = resolve_data_root(None) / "medquad" / "pairs.jsonl.gz"
    n = args.batch * args.batches
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cfg = ShardConfig(inputs=[str(source)], name="medquad", output=f"{tmp}/medquad", samples_per_shard=1000)
        shard_run(ShardJobConfig(shard=cfg))
        shard_s = time.perf_counter() - start
        ds = ShardedDataset.open(f"{tmp}/medquad")
        stream = MixtureStream([Source.of("medquad", ds)], global_batch_size=args.batch, seed=0, collate=collate)
        loader = DataLoader(stream, batch_size=None, num_workers=args.workers)
        it = iter(loader)
        next(it)  # workers started, first batch out
        start, seen = time.perf_counter(), 0
        for _ in range(args.batches):
            seen += next(it).batch_size
        stream_rate = seen / (time.perf_counter() - start)
        rows.append({"loader": f"embedscale stream, {args.workers} workers", "samples/s": round(stream_rate, 1)})

        start, seen, batch = time.perf_counter(), 0, []
        with gzip.open(source, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                batch.append(PairExample(row["query"], row["positive"]))
                if len(batch) == args.batch:
                    seen += collate(batch).batch_size
                    batch = []
                    if seen >= n:
                        break
        jsonl_rate = seen / (time.perf_counter() - start)
        rows.append({"loader": "plain JSONL reader, main process", "samples/s": round(jsonl_rate, 1)})

    training = None
    # an input: the figure written beside ours, else the committed one (a smoke run writes elsewhere)
    name = "step_throughput_real.json"
    path = next((d / name for d in (RESULTS, COMMITTED) if (d / name).exists()), None)
    if path:
        for r in json.loads(path.read_text())["rows"]:
            if r["dataset"] == "medquad" and r["system"] in ("es-gc", "es-gc-tok"):
                training = max(training or 0.0, r["pairs/s"])
    if training:
        rows.append({"loader": "training consumes (MiniLM, GradCache, medquad)", "samples/s": training})
        for r in rows[:2]:
            r["x training"] = round(r["samples/s"] / training, 1)
        rows[2]["x training"] = 1.0
    report(
        "loader_throughput",
        rows,
        {"shard_seconds": round(shard_s, 1), "samples": ds.manifest["num_samples"], "shards": len(ds.shards)},
    )


if __name__ == "__main__":
    main()
