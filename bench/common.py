"""Shared helpers of the bench/ scripts: the command, the machine, a table, and bench/results/*.json."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
    """Print command, machine and table; write bench/results/<name>.json with the same figures."""
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
