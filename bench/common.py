"""Shared helpers of the bench/ scripts: the command, the machine, a table, and bench/results/*.json.

Results go to bench/results/ (committed), or to $EMBEDSCALE_BENCH_RESULTS when set (the smoke tests set it so
that a tiny run never overwrites a committed figure)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

COMMITTED = Path(__file__).resolve().parent / "results"
"""The committed results (also read as inputs, e.g. by loader_throughput.py)."""
RESULTS = Path(os.environ.get("EMBEDSCALE_BENCH_RESULTS") or COMMITTED)
"""Where the scripts write: $EMBEDSCALE_BENCH_RESULTS, else bench/results/."""


def machine() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print command, machine and table; write RESULTS/<name>.json (bench/results/) with the same figures."""
    info = machine()
    print(f"command: {command()}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"command": command(), "machine": info, "rows": rows, **(extra or {})}, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def train_mode_encoder(model: str | None, *, threads: int, query_max_length: int, document_max_length: int):
    """(encoder in train mode, tokenizer): `model` (a path; None: the packaged all-MiniLM-L6-v2), torch on
    `threads` threads, seed 0."""
    import torch

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = {"name_or_path": model} if model else {}
    encoder, tok = load_encoder(
        ModelConfig(**path, query_max_length=query_max_length, document_max_length=document_max_length)
    )
    return encoder.train(), tok


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (allocator, lazy inits)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weights(path: Path) -> dict:
    """The exported weights of a training run directory (its model/), or of a model directory itself."""
    from safetensors.torch import load_file

    exported = path / "model" / "model.safetensors"
    return load_file(exported if exported.exists() else path / "model.safetensors")


def rel_diff(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over all tensors of two state dicts with the same names."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    return max((a[k] - b[k]).abs().max().item() for k in b) / max(b[k].abs().max().item() for k in b)


def train_env(**extra: str) -> dict:
    """The environment of a training subprocess: no launcher variables of this process (MASTER_*, RANK, ...), no
    allocator setting, offline hub, no W&B, one OpenMP thread; plus `extra`."""
    launch = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MALLOC_MMAP_THRESHOLD_",
        "EMBEDSCALE_MALLOC",
    )
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", **extra)
    return env
