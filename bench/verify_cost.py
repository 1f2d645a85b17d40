"""What data.verify costs when a sharded dataset opens: the first open (every tar and index sidecar hashed), an
unchanged dataset opened again (sizes and modification times against the verification cache), sizes only, off.

    python bench/verify_cost.py --rounds 5

MedQuAD pairs (../shared/data/medquad/pairs.jsonl.gz, 16,359 pairs) are sharded once into a temporary directory
(`embedscale shard`, --per-shard samples per shard). Each round opens the dataset in every mode, in turn
(interleaved), with a fresh verification cache for `full, first open`; the table gives the median seconds of
`ShardedDataset.open` and, for scale, one pass reading every sample (index seek + JSON decode, no tokenising).
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="shard only the first N pairs (smoke tests)")
    args = parser.parse_args()

    from embedscale.config import ShardConfig, ShardJobConfig
    from embedscale.data.records import resolve_data_root
    from embedscale.data.shards import ShardedDataset
    from embedscale.jobs.shard import run as shard_run

    source = resolve_data_root(None) / "medquad" / "pairs.jsonl.gz"
    with tempfile.TemporaryDirectory() as tmp:
        if args.limit:
            with gzip.open(source, "rt", encoding="utf-8") as f:
                head = [line for _, line in zip(range(args.limit), f, strict=False)]
            source = Path(tmp) / "pairs.jsonl"
            source.write_text("".join(head), encoding="utf-8")
        cfg = ShardConfig(
            inputs=[str(source)],
            name="medquad",
            output=f"{tmp}/medquad",
            samples_per_shard=args.per_shard,
        )
        shard_run(ShardJobConfig(shard=cfg))
        root = f"{tmp}/medquad"
        files = [p for p in Path(root).iterdir() if p.suffix in (".tar", ".npy")]
        mib = sum(p.stat().st_size for p in files) / 2**20
        modes = {
            "full, first open (hash every file)": "full",
            "full, unchanged since verified (cached)": "full",
            "size (sizes only)": "size",
            "off": "off",
        }
        times: dict[str, list[float]] = {label: [] for label in modes}
        read_times = []
        for r in range(args.rounds):
            for label, mode in modes.items():
                if label.startswith("full, first"):
                    os.environ["EMBEDSCALE_CACHE"] = f"{tmp}/cache-{r}"  # nothing verified yet
                start = time.perf_counter()
                ds = ShardedDataset.open(root, verify=mode)
                times[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            samples = sum(1 for i, s in enumerate(ds.shards) for _ in ds.read(i, range(int(s["samples"]))))
            read_times.append(time.perf_counter() - start)
        read = statistics.median(read_times)
        rows = [
            {
                "open": label,
                "median_s": statistics.median(t),
                "min_s": min(t),
                "max_s": max(t),
                "MiB_per_s": mib / statistics.median(t) if label.startswith("full, first") else None,
                "vs_one_read_pass": statistics.median(t) / read,
            }
            for label, t in times.items()
        ]
        rows.append(
            {
                "open": f"(for scale) one pass reading all {samples} samples",
                "median_s": read,
                "min_s": min(read_times),
                "max_s": max(read_times),
                "MiB_per_s": mib / read,
                "vs_one_read_pass": 1.0,
            }
        )
    report(
        "verify_cost",
        rows,
        {
            "dataset": {"pairs": samples, "shards": len(ds.shards), "files": len(files), "MiB": mib},
            "rounds": args.rounds,
        },
    )


if __name__ == "__main__":
    main()
